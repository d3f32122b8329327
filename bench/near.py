#!/usr/bin/env python3
"""Helpers of bench/near (the near cache's measurements, issue 15). Subcommands:

  measure --raw DIR --name NAME --pid LABEL=PID... [--port P] -- CMD...
      Runs CMD (wrk or redis-benchmark), its stdout to DIR/NAME.txt, and writes DIR/NAME.json:
      wall time; CPU seconds of each --pid process, of CMD (the load generator) and of the
      whole machine over the run (the rest is "others": Postgres, and whatever else runs on
      the box: the noise indicator); the run's result (wrk's WRKJSON line or
      redis-benchmark's CSV); with --port, the service's near-cache and cache lookup
      counters before and after (the near cache's hit ratio over the run).
  populate --count N --size S
      Prints to stdout the Redis protocol of SET key:<12 digits> <S bytes> for 0..N-1, the
      keys redis-benchmark -r N reads (pipe it into redis-cli --pipe).
  sample --pid PID --port P --out F [--interval 0.25]
      Until SIGTERM: one JSON line per tick with the service's RSS and peak RSS (/proc) and
      its itemcache_near_cache_bytes and evictions by cause.
  stale --a PA --b PB --first-id K --trials N --out F [--ttl-ms T]
      The cross-instance staleness bound: per trial, reads id K+i on instance A until its
      Cache-Status says detail=near (A holds it in L1), then reads it on A back to back (one
      keep-alive connection) and, after a few of those reads, PATCHes it on B; both sockets
      driven by one select() loop. Records B's 200 and every A read, and reports how long
      after B's 200 A went on answering the old version.
  report RAW OUT
      Writes OUT (bench/results/near.md) from RAW/*.json and meta.json.
"""

import argparse
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, Stop, add_options, command_after_dashes, cpu_s,  # noqa: E402
                    machine_jiffies, metric_samples, parse_head, status_fields)


def metrics(port):
    """{name{labels}: value} of the service's /metrics (near cache and cache lookups only)."""
    out = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return out
    for name, labels, value in metric_samples(text, raw_labels=True):
        if not (name.startswith("itemcache_near_cache") or name == "itemcache_cache_lookups_total"):
            continue
        out[name + ("{" + labels + "}" if labels else "")] = value
    return out


def machine_busy():
    return machine_jiffies()[0] / CLK_TCK


def parse_result(text):
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return {"tool": "wrk", **json.loads(line[8:])}
    lines = [l for l in text.splitlines() if l.startswith('"')]
    if len(lines) >= 2:  # redis-benchmark --csv: a header line, then one line per test
        head = [h.strip('"') for h in lines[0].split(",")]
        vals = [v.strip('"') for v in lines[1].split(",")]
        row = dict(zip(head, vals))
        return {"tool": "redis-benchmark", "rps": float(row["rps"]),
                "avg_ms": float(row["avg_latency_ms"]), "p50_ms": float(row["p50_latency_ms"]),
                "p99_ms": float(row["p99_latency_ms"])}
    return {}


def cmd_measure(a):
    pids = dict(p.split("=", 1) for p in a.pid)
    before = {k: cpu_s(v) for k, v in pids.items()}
    m0 = metrics(a.port) if a.port else {}
    busy0 = machine_busy()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(os.path.join(a.raw, a.name + ".txt"), "w") as out:
        rc = subprocess.run(a.command, stdout=out).returncode
    t1 = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = machine_busy()
    m1 = metrics(a.port) if a.port else {}
    after = {k: cpu_s(v) for k, v in pids.items()}
    if rc != 0:
        sys.exit(f"{a.command[0]} failed (exit {rc})")
    wall = t1 - t0
    cpu = {k: (after[k] - before[k]) if before[k] is not None and after[k] is not None else None
           for k in pids}
    cpu["loadgen"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    machine = busy1 - busy0
    others = machine - sum(v for v in cpu.values() if v)
    delta = {k: m1.get(k, 0) - m0.get(k, 0) for k in set(m0) | set(m1)}
    near_hit = delta.get('itemcache_near_cache_lookups_total{result="hit"}', 0)
    near_miss = delta.get('itemcache_near_cache_lookups_total{result="miss"}', 0)
    with open(os.path.join(a.raw, a.name + ".txt")) as f:
        result = parse_result(f.read())
    if result.get("tool") == "wrk":
        result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    doc = {"name": a.name, "start": t0, "end": t1, "wall_s": wall, "cmd": a.command,
           "env": {k: v for k, v in os.environ.items() if k.startswith(("BENCH_", "CACHE_"))},
           "result": result,
           "cpu_cores": {k: (v / wall if v is not None else None) for k, v in cpu.items()},
           "machine_cores": machine / wall, "others_cores": others / wall,
           "near": {"hit": near_hit, "miss": near_miss,
                    "hit_ratio": near_hit / (near_hit + near_miss) if near_hit + near_miss else None},
           "metrics_delta": delta, "metrics_after": m1}
    with open(os.path.join(a.raw, a.name + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
    r = result
    line = f"{a.name}: {r.get('rps', 0):,.0f} req/s"
    if r.get("tool") == "wrk":
        line += f", mean {r['latency_us']['mean'] / 1000:.3f} ms, errors {r['errors']}"
    else:
        line += f", p50 {r.get('p50_ms')} ms"
    if doc["near"]["hit_ratio"] is not None:
        line += f", L1 hit ratio {doc['near']['hit_ratio']:.3f}"
    line += f"; machine {doc['machine_cores']:.2f} cores, others {doc['others_cores']:.2f}"
    print(line, file=sys.stderr)


def cmd_populate(a):
    value = b"x" * a.size
    out = sys.stdout.buffer
    chunk = []
    for i in range(a.count):
        key = b"key:%012d" % i
        chunk.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
        if len(chunk) == 10000:
            out.write(b"".join(chunk))
            chunk = []
    out.write(b"".join(chunk))


def cmd_sample(a):
    stop = Stop(signal.SIGTERM)
    with open(a.out, "w") as out:
        while not stop.set:
            row = {"t": time.time()}
            try:
                row.update(status_fields(a.pid, {"VmRSS": "rss_kib", "VmHWM": "hwm_kib"}))
            except OSError:
                break
            m = metrics(a.port)
            row["near_bytes"] = m.get("itemcache_near_cache_bytes")
            row["evictions"] = {k.split('"')[1]: v for k, v in m.items()
                                if k.startswith("itemcache_near_cache_evictions_total")}
            out.write(json.dumps(row) + "\n")
            out.flush()
            time.sleep(a.interval)


class Conn:
    """One keep-alive HTTP/1.1 connection, driven by select(): no threads, so no GIL
    hand-offs in the timings (a thread waiting for the GIL can wait 5 ms)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, method, path, body=b""):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)

    def feed(self):
        """Reads what arrived; returns a complete response (status, headers, body) or None."""
        data = self.sock.recv(65536)
        if not data:
            raise SystemExit("connection closed")
        self.buf += data
        return self.parse()

    def parse(self):
        head = parse_head(self.buf)
        if head is None:
            return None
        status, headers, start, n = head
        if len(self.buf) < start + n:
            return None
        body = self.buf[start:start + n]
        self.buf = self.buf[start + n:]
        return status, headers, body

    def request(self, method, path, body=b""):
        self.send(method, path, body)
        while True:
            r = self.feed()
            if r:
                return r


def cmd_stale(a):
    ca, cb = Conn(a.a), Conn(a.b)

    def version(resp, what):
        status, headers, body = resp
        if status != 200:
            raise SystemExit(f"{what}: {status} {body[:200]!r}")
        return json.loads(body)["version"], "detail=near" in headers.get("cache-status", "")

    trials = []
    not_held = 0
    for i in range(a.trials):
        id_ = a.first_id + i
        path = f"/items/{id_}"
        held = False
        for _ in range(50):
            v_old, near = version(ca.request("GET", path), "GET on A")
            if near:
                held = True
                break
            time.sleep(0.002)
        if not held:
            not_held += 1
            continue
        reads = []  # (sent, received, version, near) of A's reads
        a_sent = time.monotonic()
        ca.send("GET", path)
        # a few of A's reads go before the write
        pre = 2 + i % 4
        acked = None
        v_new = None
        w_sent = None
        deadline = time.monotonic() + a.ttl_ms / 1000 + 2
        while time.monotonic() < deadline:
            ready, _, _ = select.select([ca.sock, cb.sock], [], [], 0.5)
            now = time.monotonic()
            if cb.sock in ready:
                r = cb.feed()
                if r:
                    acked = now
                    v_new, _ = version(r, "PATCH on B")
            if ca.sock in ready:
                r = ca.feed()
                if r:
                    v, near = version(r, "GET on A")
                    reads.append((a_sent, now, v, near))
                    if acked is not None and v >= v_new:
                        break
                    if len(reads) == pre and w_sent is None:
                        w_sent = time.monotonic()
                        cb.send("PATCH", path, json.dumps({"price_cents": 1000 + i}).encode())
                    a_sent = time.monotonic()
                    ca.send("GET", path)
        else:
            raise SystemExit(f"trial {i}: no new version on A within {a.ttl_ms + 2000} ms")
        first_new = next(x for x in reads if x[2] >= v_new)
        # A's reads sent after B's 200 that still answered the old version: stale.
        stale_after = [x for x in reads if x[0] >= acked and x[2] < v_new]
        gaps = [y[0] - x[0] for x, y in zip(reads, reads[1:])]
        trials.append({
            "id": id_, "v_old": v_old, "v_new": v_new, "write_ms": (acked - w_sent) * 1000,
            # B's 200 -> receipt of the first A read that answered the new version
            "to_first_new_ms": (first_new[1] - acked) * 1000,
            # B's 200 -> the start of the last stale A read (0: none sent after the 200)
            "stale_window_ms": max([(x[0] - acked) * 1000 for x in stale_after], default=0.0),
            "stale_reads_after_ack": len(stale_after),
            "stale_near": sum(1 for x in stale_after if x[3]),
            "old_reads_during_write": sum(1 for x in reads if x[0] >= w_sent and x[2] < v_new),
            "reads": len(reads),
            "read_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
        })
        # The pending GET on A, if any, was answered (the loop ended on a response).
        time.sleep(0.005)

    def q(vals, p):
        vals = sorted(vals)
        if not vals:
            return None
        return vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))]

    fn = [t["to_first_new_ms"] for t in trials]
    sw = [t["stale_window_ms"] for t in trials]
    summary = {
        "trials": len(trials), "not_held_in_l1": not_held, "ttl_ms": a.ttl_ms,
        "to_first_new_ms": {"p50": q(fn, 50), "p99": q(fn, 99), "max": max(fn, default=None),
                            "min": min(fn, default=None), "mean": statistics.mean(fn) if fn else None},
        "stale_window_ms": {"p50": q(sw, 50), "p99": q(sw, 99), "max": max(sw, default=None)},
        "trials_with_stale_read_after_ack": sum(1 for t in trials if t["stale_reads_after_ack"]),
        "beyond_ttl": sum(1 for v in fn if v > a.ttl_ms),
        "write_ms": {"p50": q([t["write_ms"] for t in trials], 50),
                     "p99": q([t["write_ms"] for t in trials], 99)},
        "read_gap_ms": {"p50": q([t["read_gap_ms"] for t in trials if t["read_gap_ms"]], 50)},
    }
    with open(a.out, "w") as f:
        json.dump({"summary": summary, "trials": trials}, f, indent=1)
    print(json.dumps(summary), file=sys.stderr)


# --- report ----------------------------------------------------------------------------------


def load(raw, name):
    p = os.path.join(raw, name + ".json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def runs(raw, prefix):
    """Every measured run NAME.rN.json of a scenario, in round order."""
    out = []
    for r in range(1, 10):
        d = load(raw, f"{prefix}.r{r}")
        if d:
            out.append(d)
    return out


def fmt_n(x):
    return f"{x:,.0f}"


def spread(vals):
    if len(vals) < 2:
        return ""
    return f" (runs: {', '.join(fmt_n(v) for v in vals)})"


def cmd_report(a):
    raw = a.raw
    meta = json.load(open(os.path.join(raw, "meta.json")))
    L = []
    w = L.append
    w("# Near cache (L1) — issue 15\n")
    w(f"`bench/near`{' --smoke (numbers mean nothing)' if meta['smoke'] else ''}, "
      f"{meta['started_utc']}, checkout at {meta['commit']} (binary: {meta.get('binary', '?')}{'; ' + meta['binary_source'] if meta.get('binary_source') else ''}), {meta['items']:,} items, "
      f"entry {meta['value_bytes']} bytes (item JSON {meta['item_bytes']} + 20), "
      f"{meta['nproc']} cores shared by the service, Redis, Postgres and the load generator; "
      f"{meta['rounds']} rounds of each comparison, alternated; {meta['measure_s']} s measured after "
      f"{meta['warm_s']} s of warm-up per run. L1 on: `CACHE_L1_MAX_MB={meta['l1_mb']}`, "
      f"`CACHE_L1_TTL_MS` default (1000) unless said; `CACHE_TTL_SECS=3600` (Redis entries do not expire during the run). Raw: `bench/results/raw/{os.path.basename(raw)}/`.\n")

    def med(rs, f):
        return statistics.median([f(r) for r in rs]) if rs else None

    rps = lambda r: r["result"]["rps"]  # noqa: E731
    # At 1 connection the mean is the run's time over its requests (a closed loop: each
    # request waits for the last). wrk's own histogram mean disagrees with its request count
    # here (e.g. 358 µs "Avg" at 21,086 req/s on one connection), so it is not used.
    mean_ms = lambda r: r["result"]["duration_us"] / r["result"]["requests"] / 1000  # noqa: E731
    hitr = lambda r: r["near"]["hit_ratio"] or 0.0  # noqa: E731
    svc_us = lambda r: r["cpu_cores"]["svc"] * r["wall_s"] / r["result"]["requests"] * 1e6  # noqa: E731
    others = lambda r: r["others_cores"]  # noqa: E731

    rb64 = load(raw, "ref.redis.c64")
    rb1 = load(raw, "ref.redis.c1")
    rb64_rps = rb64["result"]["rps"] if rb64 else None
    rb1_p50 = rb1["result"]["p50_ms"] if rb1 else None

    # The targets use the quiet runs: those during which everything else on the box (not
    # the service, Redis or the load generator) used at most 0.3 of a core; all runs when
    # none was quiet. Every run is listed below with that figure.
    def quiet(rs):
        q = [r for r in rs if r["others_cores"] <= 0.3]
        return q or rs

    zon, zoff = quiet(runs(raw, "zipf.on.c64")), quiet(runs(raw, "zipf.off.c64"))
    c1on, c1off = quiet(runs(raw, "zipf.on.c1")), quiet(runs(raw, "zipf.off.c1"))
    hot1 = quiet(runs(raw, "hot.on.c1"))
    uon, uoff = quiet(runs(raw, "uniform.on.c64")), quiet(runs(raw, "uniform.off.c64"))

    w("## Targets\n")
    w("Medians of the quiet runs (everything but the service, Redis and the load generator under "
      "0.3 of a core during the run; every run is listed below).\n")
    w("| target | measured | ratio | result |")
    w("| --- | --- | --- | --- |")
    if zon and rb64_rps:
        v = med(zon, rps)
        ratio = v / rb64_rps
        res = "met" if ratio >= 1.3 else f"missed by {(1.3 - ratio) / 1.3 * 100:.0f} % ({ratio:.2f} of 1.3)"
        w(f"| Zipf(0.99) hit path, L1 on, 64 connections ≥ 1.3 × `redis-benchmark -t get -c 64` | "
          f"{fmt_n(v)} vs {fmt_n(rb64_rps)} req/s{spread([rps(r) for r in zon])}; L1 hit ratio "
          f"{med(zon, hitr):.3f} | {ratio:.2f} | {res} |")
    if c1on and rb1_p50:
        v = med(c1on, mean_ms)
        ratio = v / rb1_p50
        res = "met" if ratio <= 2 else f"missed: {ratio:.1f} × instead of 2 × ({ratio / 2:.1f} × over)"
        w(f"| hit mean latency, 1 connection, L1 on (Zipf) ≤ 2 × `redis-benchmark -c 1` p50 | "
          f"{v:.3f} vs {rb1_p50:.3f} ms; L1 hit ratio {med(c1on, hitr):.3f} | {ratio:.1f} | {res} |")
    if uon and uoff:
        von, voff = med(uon, rps), med(uoff, rps)
        ratio = von / voff
        res = "met" if ratio >= 1 else f"missed by {(1 - ratio) * 100:.1f} %"
        w(f"| uniform hits over {meta['items']:,} ids, L1 on ≥ L1 off, 64 connections | "
          f"{fmt_n(von)} vs {fmt_n(voff)} req/s; L1 hit ratio {med(uon, hitr):.3f} | {ratio:.3f} | {res} "
          f"(run-to-run spread below) |")
    sweep = load(raw, "sweep.l1-small")
    if sweep:
        w(f"| memory bound under a sweep of every id, `CACHE_L1_MAX_MB={sweep['l1_mb']}` | near cache's own "
          f"count at most {sweep['near_bytes_max'] / 2**20:.1f} MiB; RSS peak {sweep['hwm_kib'] / 1024:.0f} MiB "
          f"vs {sweep['base_hwm_kib'] / 1024:.0f} MiB with L1 off: +{(sweep['hwm_kib'] - sweep['base_hwm_kib']) / 1024:.0f} MiB | "
          f"{(sweep['hwm_kib'] - sweep['base_hwm_kib']) / 1024 / sweep['l1_mb']:.2f} of the bound | "
          f"the cache's own count {'held' if sweep['near_bytes_max'] <= sweep['l1_mb'] * 2**20 else 'exceeded'} it; "
          f"RSS {'held' if (sweep['hwm_kib'] - sweep['base_hwm_kib']) / 1024 <= sweep['l1_mb'] else 'did not: ' + format((sweep['hwm_kib'] - sweep['base_hwm_kib']) / 1024 / sweep['l1_mb'], '.1f') + ' × the bound'} |")
    st = load(raw, "stale.idle")
    if st:
        s = st["summary"]
        w(f"| staleness on another instance after a write (bound: Redis's push, capped by "
          f"`CACHE_L1_TTL_MS`={s['ttl_ms']} ms) | B's 200 → A's first new read: p50 "
          f"{s['to_first_new_ms']['p50']:.2f} ms, p99 {s['to_first_new_ms']['p99']:.2f} ms, max "
          f"{s['to_first_new_ms']['max']:.2f} ms ({s['trials']} writes) | | "
          f"{s['beyond_ttl']} beyond {s['ttl_ms']} ms |")
    w("")

    w("## References (same run)\n")
    w("| reference | req/s | mean / p50 / p99 ms | machine cores / others' cores |")
    w("| --- | --- | --- | --- |")
    for name in ("ref.redis.c64", "ref.redis.c1"):
        r = load(raw, name)
        if r:
            x = r["result"]
            w(f"| `redis-benchmark -t get -r {meta['items']} -d {meta['value_bytes']} -c {name[-1] if name.endswith('c1') else 64}` "
              f"| {fmt_n(x['rps'])} | {x['avg_ms']:.3f} / {x['p50_ms']:.3f} / {x['p99_ms']:.3f} | "
              f"{r['machine_cores']:.2f} / {r['others_cores']:.2f} |")
    w("")

    w("## Every run\n")
    w("`L1 hits` is the near cache's hit ratio over the measured run (its lookup counters); "
      "`svc CPU/req` the service's CPU per request; `others` the cores used by everything "
      "but the service, Redis and the load generator during the run (Postgres and other "
      "work on the box: the noise).\n")
    w("| run | req/s | mean ms (1 conn.: time ÷ requests) | wrk p50 / p99 ms | L1 hits | svc CPU/req µs | svc cores | others' cores |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    order = ["zipf.off.c64", "zipf.on.c64", "zipf.on-ttl10s.c64", "uniform.off.c64", "uniform.on.c64",
             "zipf.off.c1", "zipf.on.c1", "hot.on.c1", "hot.off.c1"]
    for prefix in order:
        for r in runs(raw, prefix):
            x = r["result"]
            mean = mean_ms(r) if ".c1." in r["name"] else x["latency_us"]["mean"] / 1000
            w(f"| {r['name']} | {fmt_n(x['rps'])} | {mean:.3f} | "
              f"{x['latency_us']['p']['50'] / 1000:.3f} / {x['latency_us']['p']['99'] / 1000:.3f} | "
              f"{'' if r['near']['hit_ratio'] is None else format(r['near']['hit_ratio'], '.3f')} | "
              f"{svc_us(r):.1f} | {r['cpu_cores']['svc']:.2f} | {others(r):.2f} |")
    w("")
    if zon and zoff:
        w(f"Zipf, 64 connections: L1 on / L1 off = {med(zon, rps) / med(zoff, rps):.2f} × "
          f"(service CPU per request {med(zon, svc_us):.1f} vs {med(zoff, svc_us):.1f} µs).")
    if c1on and c1off and rb1_p50:
        w(f"Zipf, 1 connection: mean {med(c1on, mean_ms):.3f} ms L1 on, {med(c1off, mean_ms):.3f} ms L1 off "
          f"({med(c1off, mean_ms) / rb1_p50:.1f} × the reference p50).")
    if hot1 and rb1_p50:
        w(f"Every read an L1 hit (ids 1..1,000, uniform), 1 connection: mean {med(hot1, mean_ms):.3f} ms = "
          f"{med(hot1, mean_ms) / rb1_p50:.1f} × the reference p50; the static floor's is in bench/run's report.")
    w("")

    w("## Memory under a key-space sweep\n")
    w("Every id read once, in order (`lua/sequential.lua`, 64 connections; all of them in Redis, so "
      "each read is an L1 miss that stores), `CACHE_L1_TTL_MS=60000` so that the byte bound, not "
      "the TTL, limits what is held. RSS from `/proc/<pid>/status` every 0.25 s (VmRSS, VmHWM); "
      "the near cache's own count from `itemcache_near_cache_bytes` (updated every second).\n")
    w("| run | requests | RSS before | RSS peak (VmHWM) | RSS at end | near_cache_bytes max | evictions (size) |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for name in ("sweep.off", "sweep.l1-small", "sweep.l1-large"):
        s = load(raw, name)
        if not s:
            continue
        label = "L1 off" if s["l1_mb"] == 0 else f"`CACHE_L1_MAX_MB={s['l1_mb']}`"
        w(f"| {label} | {fmt_n(s['requests'])} | {s['rss_before_kib'] / 1024:.0f} MiB | {s['hwm_kib'] / 1024:.0f} MiB | "
          f"{s['rss_end_kib'] / 1024:.0f} MiB | "
          f"{'' if s['near_bytes_max'] is None else format(s['near_bytes_max'] / 2**20, '.1f') + ' MiB'} | "
          f"{fmt_n(s['evictions'].get('size', 0))} |")
    w("")

    w("## Staleness across instances\n")
    w("Two instances (A, B) with L1 on, one Redis, one Postgres. Per write: A reads the id until its "
      "`Cache-Status` says `detail=near` (A holds it in L1), then reads it on A back to back "
      "(one keep-alive connection) and, a few reads in, PATCHes it on B (one select() loop drives both "
      "sockets, so the timestamps are the client's receipts). *B's 200 → A's first new read*: from the moment "
      "the client has B's 200 to the receipt of the first A answer with the new version. *Stale window*: "
      "from B's 200 to the start of the last A read that still answered the old version (0 when no read "
      "sent after the 200 was stale).\n")
    w("| condition | writes | B's 200 → A's first new read p50 / p99 / max (ms) | stale window p50 / p99 / max (ms) | writes with a stale read after the 200 | beyond `CACHE_L1_TTL_MS` | A's poll gap (ms) |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in (("stale.idle", "idle"), ("stale.loaded", "A under Zipf load, 64 connections")):
        s = load(raw, name)
        if not s:
            continue
        s = s["summary"]
        f, sw = s["to_first_new_ms"], s["stale_window_ms"]
        w(f"| {label} | {s['trials']} | {f['p50']:.2f} / {f['p99']:.2f} / {f['max']:.2f} | "
          f"{sw['p50']:.2f} / {sw['p99']:.2f} / {sw['max']:.2f} | {s['trials_with_stale_read_after_ack']} | "
          f"{s['beyond_ttl']} | {s['read_gap_ms']['p50']:.2f} |")
    w("")
    prof = os.path.join(raw, "perf-summary.txt")
    if os.path.exists(prof):
        w("## Profile (L1 on, 64 connections; `perf record -e cpu-clock -g` on the service, 8 s)\n")
        w("```text")
        w("\n".join(l.rstrip()[:150] for l in open(prof).read().rstrip().splitlines()))
        w("```\n")
    with open(a.out, "w") as f:
        f.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="sub", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--raw", required=True)
    m.add_argument("--name", required=True)
    m.add_argument("--pid", action="append", default=[])
    m.add_argument("--port", type=int)
    m.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("populate")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    s = sub.add_parser("sample")
    s.add_argument("--pid", type=int, required=True)
    add_options(s, "--port", "--out")
    s.add_argument("--interval", type=float, default=0.25)
    st = sub.add_parser("stale")
    st.add_argument("--a", type=int, required=True)
    st.add_argument("--b", type=int, required=True)
    st.add_argument("--first-id", type=int, required=True)
    st.add_argument("--trials", type=int, required=True)
    st.add_argument("--ttl-ms", type=int, default=1000)
    add_options(st, "--out")
    r = sub.add_parser("report")
    r.add_argument("raw")
    r.add_argument("out")
    a = ap.parse_args()
    if a.sub == "measure":
        a.command = command_after_dashes(a.command)
        cmd_measure(a)
    elif a.sub == "populate":
        cmd_populate(a)
    elif a.sub == "sample":
        cmd_sample(a)
    elif a.sub == "stale":
        cmd_stale(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
