# itemcache container image.
#
#   docker build -t itemcache .          (or: docker compose build)
#
# Two stages: a Rust toolchain builds a release binary; the final image is
# debian-slim with ca-certificates, a non-root user and that one binary (no libpq:
# the binary links only libc, libm and libgcc_s). Works with BuildKit and with the
# classic builder (no cache mounts, no syntax directive to pull).
#
# Tags are pinned; pin digests too (image@sha256:...) where builds must be repeatable.

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS builder

ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

WORKDIR /build

# 1. Dependencies only: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
#    A placeholder main.rs lets cargo compile every dependency. If the manifest ever
#    names target files that the placeholder does not provide, this step only loses
#    its caching (the full build below compiles everything and checks --locked again).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && { cargo build --release --locked \
      || echo "dependency pre-build failed; the full build below will compile everything"; } \
 && rm -rf src

# 2. The crate itself. migrations/ is embedded into the binary at compile time.
#    COPY keeps the sources' modification times, which can be older than the
#    placeholder's: touch them so cargo cannot mistake the placeholder build for fresh.
COPY Cargo.toml Cargo.lock build.rs* ./
COPY src ./src
COPY migrations ./migrations
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/itemcache /out/itemcache

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE}

# ca-certificates: for TLS to managed Postgres/Redis should it ever be configured.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 itemcache \
 && useradd --system --uid 10001 --gid itemcache --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin itemcache

COPY --from=builder /out/itemcache /usr/local/bin/itemcache

# The service reads ./.env if present; an empty working directory means "none".
WORKDIR /app
USER 10001:10001

ENV LISTEN_ADDR=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
STOPSIGNAL SIGTERM

# Liveness without curl or wget (neither is in debian-slim): bash's /dev/tcp sends a
# plain HTTP/1.1 GET /healthz to the port in LISTEN_ADDR and wants a 200 status line.
# docker-compose.yml overrides this with the same probe on /readyz (Postgres reachable).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${LISTEN_ADDR##*:} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 line <&3 && [[ $line == 'HTTP/1.'?' 200'* ]]"]

ENTRYPOINT ["/usr/local/bin/itemcache"]
CMD ["serve"]
