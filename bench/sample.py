#!/usr/bin/env python3
"""Samples the service once a second for the whole bench run, one JSON line per sample.

Each line: wall time, other engineers' build/test processes (count, CPU seconds since the
previous line), the service's pid, RSS, open fds, threads, CPU seconds used (user +
system), the machine's busy CPU seconds, established TCP connections on the service's,
Redis's and Postgres's ports, and from GET /metrics: cache lookups by result, coalesced
reads, cache errors, and the item-read latency histogram (GET /items/{id}, summed over
cache labels, and per cache label). bench/analyze.py slices it by the phase windows that
bench/run records.

The service is restarted during a run (to switch the cache off), so the pid is read from
a file every tick. Runs until SIGTERM.

    sample.py --pidfile F --port P --redis-port R --pg-port Q --out samples.jsonl
"""

import argparse
import os
import re
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, Stop, add_options, append_jsonl, machine_jiffies,  # noqa: E402
                    metric_samples, read_pid, stat_fields, status_fields, ticks)


def proc_stats(pid):
    out = {}
    try:
        out.update(status_fields(pid, {"VmRSS": "rss_kib", "Threads": "threads"}))
        fields = stat_fields(pid)
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


# Other engineers' builds and tests (the pattern bench/run waits on): how many, and the CPU
# they used since the last tick, so a result can say whether it was measured on a quiet box.
OTHERS = re.compile(rb"rustc|cargo |deps/api-|deps/observability-|schemathesis|chromium")
_others_last = {}


def others_sample():
    global _others_last
    now = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            if not OTHERS.search(cmd):
                continue
            fields = stat_fields(pid)
            now[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except OSError:
            continue
    used = sum(v - _others_last[pid] for pid, v in now.items() if pid in _others_last)
    _others_last = now
    return {"procs": len(now), "cpu_s": round(used, 2)}


def machine_busy_s():
    busy, total = machine_jiffies()
    return busy / CLK_TCK, total / CLK_TCK


def tcp_established(ports):
    """Established connections by local port (server side) for each port in ports."""
    counts = {p: 0 for p in ports}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] != "01":  # ESTABLISHED
                        continue
                    local = int(cols[1].rsplit(":", 1)[1], 16)
                    if local in counts:
                        counts[local] += 1
        except OSError:
            pass
    return counts


def scrape(url):
    try:
        with urllib.request.urlopen(url, timeout=0.8) as r:
            text = r.read().decode()
    except Exception:
        return None
    lookups, errors = {}, {}
    coalesced = 0.0
    hist = {}  # cache label -> {"buckets": {le: n}, "sum": s, "count": n}
    for name, labels, value in metric_samples(text):
        if name == "itemcache_cache_lookups_total":
            lookups[labels.get("result", "")] = value
        elif name == "itemcache_cache_errors_total":
            errors[labels.get("op", "")] = value
        elif name == "itemcache_coalesced_requests_total":
            coalesced = value
        elif name.startswith("itemcache_http_request_duration_seconds"):
            if labels.get("route") != "/items/{id}" or labels.get("method") != "GET":
                continue
            h = hist.setdefault(labels.get("cache", ""), {"buckets": {}, "sum": 0.0, "count": 0.0})
            if name.endswith("_bucket"):
                h["buckets"][labels["le"]] = h["buckets"].get(labels["le"], 0.0) + value
            elif name.endswith("_sum"):
                h["sum"] += value
            elif name.endswith("_count"):
                h["count"] += value
    return {"lookups": lookups, "cache_errors": errors, "coalesced": coalesced, "item_latency": hist}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pidfile", required=True)
    add_options(ap, "--port", "--redis-port")
    ap.add_argument("--pg-port", type=int, required=True)
    add_options(ap, "--out")
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    stop = Stop()
    url = f"http://127.0.0.1:{args.port}/metrics"
    ports = (args.port, args.redis_port, args.pg_port)
    with open(args.out, "a", buffering=1) as out:
        for _ in ticks(args.interval, stop):
            now = time.time()
            busy, total = machine_busy_s()
            sample = {"t": round(now, 3), "machine_busy_s": busy, "machine_total_s": total,
                      "others": others_sample()}
            pid = read_pid(args.pidfile)
            if pid:
                sample["pid"] = pid
                sample.update(proc_stats(pid))
                m = scrape(url)
                if m:
                    sample["metrics"] = m
            conns = tcp_established(ports)
            sample["conns"] = {
                "service": conns[args.port],
                "redis": conns[args.redis_port],
                "postgres": conns[args.pg_port],
            }
            append_jsonl(out, sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
