#!/usr/bin/env bash
# shellcheck shell=bash
#
# Helpers shared by scripts/up, scripts/test and bench/run. Source it; do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Functions (all die with a message on failure unless noted):
#   log MSG...                    print "==> MSG" to stderr
#   warn MSG...                   print "warning: MSG" to stderr
#   die MSG...                    print "error: MSG" to stderr and exit 1
#   is_root                       status 0 when running as uid 0
#   ensure_packages PKG...        install missing Debian packages (root), or print the
#                                 sudo command to run and exit 1 (not root)
#   ensure_optional_package PKG   like ensure_packages for one package, but never fails:
#                                 status 0 if PKG is (now) installed, 1 if not
#   ensure_cargo                  cargo on PATH (adds ~/.cargo/bin), else says how to get it
#   free_port                     print a free loopback TCP port
#   port_is_free PORT             status 0 when 127.0.0.1:PORT can be listened on
#   poll_until SECS CMD...        run CMD every 0.2 s until it succeeds; status 1 after SECS
#   wait_until SECS DESC CMD...   the same, but die after SECS
#   tcp_listening PORT            status 0 when something accepts on 127.0.0.1:PORT
#   pg_bin                        print the directory of the newest Postgres server binaries
#   start_private_postgres DIR PORT   private Postgres, data in DIR/pg, database itemcache
#   stop_private_postgres DIR     fast shutdown of the server started on DIR (no-op if none)
#   start_private_redis DIR PORT  private, memory-only Redis with pid/log files in DIR
#   stop_private_redis DIR        stop the Redis whose pid is in DIR/redis.pid (no-op if none)
#   stop_pidfile PIDFILE NAME     TERM (then KILL after 10 s) the process in PIDFILE if its
#                                 command line contains NAME; remove PIDFILE

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	echo "scripts/lib.sh holds helpers to source (. scripts/lib.sh), not a command to run" >&2
	exit 2
fi

# Sourced file: the caller sets its own shell options; these functions assume `set -euo
# pipefail` is in effect, as every script in scripts/ sets it.

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# --- Debian packages ------------------------------------------------------------------

_APT_UPDATED=${_APT_UPDATED:-0}

# Status 0 when the package is fully installed. `dpkg -s` alone also succeeds for a package
# that was removed but left its config files behind, so compare its Status field. (Asked
# for that field alone: `dpkg -s | grep -q` breaks under pipefail, since grep -q quits at
# the match and dpkg, still writing a long description, dies of SIGPIPE.)
_pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]
}

# apt-get with what a script needs: no prompts, and wait for the dpkg lock instead of
# failing when another apt-get (another helper, unattended-upgrades) holds it.
_apt_get() {
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

_apt_update_once() {
	if [[ $_APT_UPDATED -eq 0 ]]; then
		log "apt-get update"
		_apt_get update -q
		_APT_UPDATED=1
	fi
}

# ensure_packages PKG...
# --no-install-recommends: what we need is in the packages' dependencies, and recommends
# would add daemons we do not want (prometheus recommends prometheus-node-exporter).
ensure_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		_pkg_installed "$pkg" || missing+=("$pkg")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	if ! is_root; then
		printf 'error: missing Debian packages: %s\n' "${missing[*]}" >&2
		printf 'Install them with:\n\n    sudo apt-get update && sudo apt-get install -y --no-install-recommends %s\n\n' \
			"${missing[*]}" >&2
		exit 1
	fi
	_apt_update_once
	log "apt-get install ${missing[*]}"
	_apt_get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_optional_package PKG: for extras (a local Prometheus) whose absence only costs a
# feature. Never exits the script.
ensure_optional_package() {
	local pkg=$1
	_pkg_installed "$pkg" && return 0
	if ! is_root; then
		warn "optional package $pkg is not installed (sudo apt-get install -y --no-install-recommends $pkg)"
		return 1
	fi
	# apt-get update first: on a fresh image the package lists are empty, and apt-cache
	# would wrongly say the package does not exist.
	_apt_update_once || { warn "apt-get update failed; skipping $pkg"; return 1; }
	if ! apt-cache show "$pkg" >/dev/null 2>&1; then
		warn "package $pkg is not available from this machine's apt sources; skipping it"
		return 1
	fi
	log "apt-get install $pkg"
	if ! _apt_get install -y -q --no-install-recommends "$pkg"; then
		warn "could not install $pkg; going on without it"
		return 1
	fi
}

# ensure_cargo: rustup installs into ~/.cargo/bin, which a non-login shell may not have
# on PATH yet.
ensure_cargo() {
	if ! command -v cargo >/dev/null 2>&1 && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
		PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
		export PATH
	fi
	if ! command -v cargo >/dev/null 2>&1; then
		cat >&2 <<-'EOF'
			error: cargo (the Rust toolchain) is not installed.
			Install it with rustup (https://rustup.rs), then open a new shell or run
			`. "$HOME/.cargo/env"`, and run this script again:

			    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y

		EOF
		exit 1
	fi
}

# --- ports and waiting ----------------------------------------------------------------

# free_port: ask the kernel for an ephemeral port. Another process could take it before
# we bind it; on a developer machine or CI box that race is rare enough to accept.
free_port() {
	if command -v python3 >/dev/null 2>&1; then
		python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
		return
	fi
	# No python3: try random ports from the ephemeral range until nothing answers.
	local port i
	for ((i = 0; i < 100; i++)); do
		port=$((20000 + RANDOM % 30000))
		if port_is_free "$port"; then
			echo "$port"
			return
		fi
	done
	die "found no free TCP port"
}

# port_is_free PORT: with python3, a real bind with SO_REUSEADDR (as servers set it, so a
# port in TIME_WAIT counts as free); without, "nothing accepts a connection on it".
port_is_free() {
	local port=$1
	if command -v python3 >/dev/null 2>&1; then
		python3 - "$port" <<-'EOF'
			import socket, sys
			s = socket.socket()
			s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
			try:
			    s.bind(("127.0.0.1", int(sys.argv[1])))
			except OSError:
			    sys.exit(1)
		EOF
		return
	fi
	! tcp_listening "$port"
}

# poll_until SECS CMD...: run CMD (quietly) every 0.2 s until it succeeds (status 0) or
# SECS pass (status 1).
poll_until() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || return 1
		sleep 0.2
	done
}

# wait_until SECS DESC CMD...: poll_until, but a timeout is fatal.
wait_until() {
	local secs=$1 desc=$2
	shift 2
	poll_until "$secs" "$@" || die "timed out after ${secs}s waiting for $desc"
}

# tcp_listening PORT: status 0 when something accepts connections on 127.0.0.1:PORT.
tcp_listening() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# stop_pidfile PIDFILE NAME: stop a process we started earlier. The pid is only trusted if
# the process's command line still contains NAME (pids are reused).
stop_pidfile() {
	local pidfile=$1 name=$2 pid i
	[[ -f $pidfile ]] || return 0
	pid=$(<"$pidfile")
	if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] &&
		tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$name"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			warn "$name (pid $pid) did not stop in 10s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$pidfile"
}

# --- Postgres -------------------------------------------------------------------------

# pg_bin: the newest /usr/lib/postgresql/N/bin (Debian's layout). Not whatever `pg_ctl` is
# on PATH: Debian puts only wrappers and a few symlinks there (/usr/local/bin/pg_ctl on
# this kind of machine), and initdb not at all. PG_BIN overrides; pg_config is the
# fallback for non-Debian layouts.
pg_bin() {
	if [[ -n ${PG_BIN:-} ]]; then
		echo "$PG_BIN"
		return
	fi
	local dir
	dir=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null |
		sort -V | tail -n 1)
	if [[ -n $dir ]]; then
		dirname "$dir"
		return
	fi
	if command -v pg_config >/dev/null 2>&1 && [[ -x $(pg_config --bindir)/initdb ]]; then
		pg_config --bindir
		return
	fi
	die "no Postgres server binaries found (install the Debian package postgresql)"
}

# Run a Postgres server command as the right OS user. Postgres refuses to run as root, so
# as root it runs as the `postgres` user (created by Debian's package).
_as_pg() {
	if is_root; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# _pg_base DIR: where the server files for DIR live. Normally DIR itself; DIR/pg.base
# names another directory when the postgres user could not reach DIR (see below).
_pg_base() {
	local dir=$1
	if [[ -f $dir/pg.base ]]; then
		cat "$dir/pg.base"
	else
		echo "$dir"
	fi
}

# start_private_postgres DIR PORT
# Data directory DIR/pg (initdb'd on first use, kept afterwards), Unix socket in
# DIR/pgsock, log DIR/pg.log; listens on 127.0.0.1:PORT only, trust auth, user postgres.
# Leaves the database `itemcache` in place. A server still running on DIR/pg (a run that
# was killed before it could clean up) is stopped first.
start_private_postgres() {
	local dir port base bin opts sock
	mkdir -p "$1"
	dir=$(cd "$1" && pwd)
	port=$2
	bin=$(pg_bin)
	base=$(_pg_base "$dir")

	if is_root; then
		id postgres >/dev/null 2>&1 || die "no OS user 'postgres' (install the Debian package postgresql)"
		# The postgres user must be able to reach the directory: /work/main is fine, but a
		# repo under /root (mode 700) is not. Then the server files go to a directory under
		# /tmp, remembered in DIR/pg.base so later runs and stop_private_postgres find it.
		if ! runuser -u postgres -- test -x "$base"; then
			base=$(mktemp -d /tmp/itemcache-pg.XXXXXX)
			chmod 755 "$base"
			echo "$base" >"$dir/pg.base"
			warn "user postgres cannot reach $dir; keeping Postgres files in $base instead"
		fi
		# Only the server's own paths belong to postgres; DIR stays the caller's.
		mkdir -p "$base/pg" "$base/pgsock"
		touch "$base/pg.log"
		chown postgres: "$base/pg" "$base/pgsock" "$base/pg.log"
		chmod 700 "$base/pg"
	else
		mkdir -p "$base/pg" "$base/pgsock"
		chmod 700 "$base/pg"
	fi

	if [[ ! -f $base/pg/PG_VERSION ]]; then
		log "initdb $base/pg"
		# --no-sync and fsync=off (below): this is throwaway dev/test data; durability
		# against power loss buys nothing here and costs seconds.
		_as_pg "$bin/initdb" -D "$base/pg" --auth=trust -U postgres \
			--encoding=UTF8 --locale=C --no-sync >"$base/initdb.log" 2>&1 ||
			die "initdb failed; see $base/initdb.log"
	fi

	if _as_pg "$bin/pg_ctl" -D "$base/pg" status >/dev/null 2>&1; then
		warn "a Postgres left over from an earlier run is running on $base/pg; stopping it"
		_as_pg "$bin/pg_ctl" -D "$base/pg" stop -m fast -w >/dev/null
	fi

	# A Unix socket path longer than ~107 bytes cannot be bound; a deep checkout would hit
	# that. Nothing here needs the socket (clients use TCP), so then go without one.
	sock="$base/pgsock"
	if ((${#sock} + 20 > 107)); then
		sock=""
	fi
	# pg_ctl hands -o to /bin/sh, so quote the paths for a shell.
	opts="-c listen_addresses=127.0.0.1 -p $port -k $(printf '%q' "$sock")"
	opts+=" -c shared_preload_libraries=pg_stat_statements -c fsync=off"

	log "starting Postgres on 127.0.0.1:$port (data $base/pg, log $base/pg.log)"
	# setsid: its own session, so a Ctrl-C in the terminal reaches only the script, which
	# then stops things in order (the service first, the database last).
	if ! _as_pg setsid -w "$bin/pg_ctl" -D "$base/pg" -l "$base/pg.log" -w -t 60 \
		-o "$opts" start >/dev/null; then
		tail -n 20 "$base/pg.log" >&2 || true
		die "Postgres did not start; see $base/pg.log"
	fi
	wait_until 30 "Postgres on port $port" \
		"$bin/pg_isready" -h 127.0.0.1 -p "$port" -U postgres -d postgres

	if [[ -z $("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -XtAc \
		"SELECT 1 FROM pg_database WHERE datname = 'itemcache'") ]]; then
		"$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres itemcache
	fi
}

# stop_private_postgres DIR
stop_private_postgres() {
	local dir base bin
	[[ -d $1 ]] || return 0
	dir=$(cd "$1" && pwd)
	base=$(_pg_base "$dir")
	[[ -f $base/pg/postmaster.pid ]] || return 0
	bin=$(pg_bin)
	log "stopping Postgres ($base/pg)"
	_as_pg "$bin/pg_ctl" -D "$base/pg" stop -m fast -w >/dev/null 2>&1 ||
		warn "pg_ctl stop failed for $base/pg (already stopped?)"
}

# --- Redis ----------------------------------------------------------------------------

_redis_pong() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

# start_private_redis DIR PORT: memory only (no RDB, no AOF), loopback only.
start_private_redis() {
	local dir port
	mkdir -p "$1"
	dir=$(cd "$1" && pwd)
	port=$2
	command -v redis-server >/dev/null 2>&1 || die "redis-server not found (install the Debian package redis-server)"
	# A Redis left over from a killed run: stop it (only if the pid is really redis).
	if [[ -f $dir/redis.pid ]] && kill -0 "$(<"$dir/redis.pid")" 2>/dev/null; then
		warn "a Redis left over from an earlier run may be running (pid $(<"$dir/redis.pid")); stopping it"
		stop_pidfile "$dir/redis.pid" redis-server
	fi
	rm -f "$dir/redis.pid"
	log "starting Redis on 127.0.0.1:$port (log $dir/redis.log)"
	# --daemonize: redis forks into its own session and writes the pid file itself.
	redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
		--daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
	wait_until 30 "Redis on port $port" _redis_pong "$port"
}

# stop_private_redis DIR
stop_private_redis() {
	local dir
	[[ -d $1 ]] || return 0
	dir=$(cd "$1" && pwd)
	[[ -f $dir/redis.pid ]] || return 0
	log "stopping Redis ($dir)"
	stop_pidfile "$dir/redis.pid" redis-server
}
