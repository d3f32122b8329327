#!/usr/bin/env python3
"""Counters around a measured run, for the scenarios that judge work per request rather
than speed (bench/run steps 10-13: names, replica, refresh, misspath). CPU seconds and query counts
are the same whatever else the 2 cores were doing; requests per second are not.

    probe.py snapshot --label L --port P --svc-pidfile F [--redis-pidfile F] --pg NAME=PORT:PIDFILE ... --out X.jsonl
        appends one JSON line: the time; the service's CPU seconds and context switches
        (all threads); from its /metrics the
        cache lookups by result, Postgres reads by target (primary, replica), replica
        fallbacks by reason, queries by label (the itemcache_db_query_duration_seconds
        counts) and coalesced reads; and for each Postgres server (NAME: primary, standby)
        the CPU seconds of the server's whole process tree (postmaster, backends, WAL
        sender/receiver, startup; reaped children included), its context switches (live
        processes only) and, from pg_stat_statements in
        the itemcache database, the calls and execution time of statements on `items` and the
        calls of every statement; with --redis-pidfile, Redis's CPU seconds.
    probe.py monitor --interval 1 (same options)
        the same every --interval s until SIGTERM (the refresh scenario's per-second series)
    probe.py entries --redis-port R [--prefix itemcache:] [--sample 2000]
        one JSON object: how long the loads behind a sample of cached item entries took
        (the `/<load_ms>` in each entry's header, which early refresh scales with): a
        histogram in whole milliseconds

bench/analyze.py (through bench/scenarios.py) takes differences of two snapshots.
"""

import argparse
import http.client
import json
import os
import re
import sys
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Redis, Stop, add_options, append_jsonl, count_metrics, cpu_s,  # noqa: E402
                    get_metrics, read_pid, run_subcommand, stat_fields, ticks, tree_cpu_s)

# Statements on `items` in the itemcache database (the service's reads: get_item, get_items,
# ids_by_name, list_by_name; not item_changes, not this query).
ITEMS_SQL = r"""
SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(total_exec_time), 0)::float8
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'itemcache')
  AND query ~* '\mitems\M' AND query !~* 'pg_stat_statements'
"""
# Every statement in the itemcache database (BEGIN, SET, the change feed's, ...), not this query.
ALL_SQL = r"""
SELECT coalesce(sum(calls), 0)::bigint
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'itemcache')
  AND query !~* 'pg_stat_statements'
"""


def ctxsw(pid, threads=True):
    """Context switches (voluntary + involuntary) of a process's threads so far."""
    total = 0
    paths = ([f"/proc/{pid}/task/{t}/status" for t in os.listdir(f"/proc/{pid}/task")] if threads
             else [f"/proc/{pid}/status"])
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def tree_ctxsw(parent):
    """A server's context switches: the parent's and its live children's (backends that
    exited are not counted: the pool's are long-lived)."""
    try:
        total = ctxsw(parent, threads=False)
    except OSError:
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(stat_fields(int(name))[1]) == parent:
                total += ctxsw(int(name), threads=False)
        except OSError:
            continue
    return total


def scrape(port):
    text = get_metrics(port, timeout=2)
    out = {"lookups": {}, "db_reads": {}, "fallbacks": {}, "queries": {}, "coalesced": 0.0}
    count_metrics(text, out, {
        "itemcache_cache_lookups_total": ("lookups", "result"),
        "itemcache_db_reads_total": ("db_reads", "target"),
        "itemcache_replica_fallbacks_total": ("fallbacks", "reason"),
        "itemcache_db_query_duration_seconds_count": ("queries", "query"),
        "itemcache_coalesced_requests_total": ("coalesced", None),
    })
    return out


class Servers:
    """The Postgres servers to read: NAME=PORT:PIDFILE each; connections kept open."""

    def __init__(self, specs):
        self.servers = []
        for spec in specs or []:
            name, rest = spec.split("=", 1)
            port, pidfile = rest.split(":", 1)
            self.servers.append({"name": name, "port": int(port), "pidfile": pidfile, "db": None})

    def read(self):
        out = {}
        for s in self.servers:
            row = {}
            pid = read_pid(s["pidfile"])
            if pid:
                row["cpu_s"] = tree_cpu_s(pid)
                row["ctxsw"] = tree_ctxsw(pid)
            try:
                if s["db"] is None:
                    s["db"] = psycopg.connect(f"postgresql://postgres@127.0.0.1:{s['port']}/itemcache",
                                              autocommit=True, connect_timeout=2)
                calls, ms = s["db"].execute(ITEMS_SQL).fetchone()
                row["items_calls"], row["items_exec_ms"] = int(calls), round(ms, 3)
                row["all_calls"] = int(s["db"].execute(ALL_SQL).fetchone()[0])
            except psycopg.Error as e:
                row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                s["db"] = None
            out[s["name"]] = row
        return out


def snapshot(args, servers, label=None):
    s = {"t": round(time.time(), 3)}
    if label:
        s["label"] = label
    pid = read_pid(args.svc_pidfile) if args.svc_pidfile else None
    if pid:
        s["pid"], s["svc_cpu_s"] = pid, cpu_s(pid)
        try:
            s["svc_ctxsw"] = ctxsw(pid)
        except OSError:
            pass
        try:
            s["metrics"] = scrape(args.port)
        except (OSError, http.client.HTTPException, ValueError):
            pass
    s["pg"] = servers.read()
    rpid = read_pid(args.redis_pidfile) if args.redis_pidfile else None
    if rpid:
        s["redis_cpu_s"] = cpu_s(rpid)
    return s


def cmd_snapshot(args):
    servers = Servers(args.pg)
    with open(args.out, "a") as out:
        append_jsonl(out, snapshot(args, servers, args.label))
    return 0


def cmd_monitor(args):
    stop = Stop()
    servers = Servers(args.pg)
    with open(args.out, "a", buffering=1) as out:
        for _ in ticks(args.interval, stop):
            append_jsonl(out, snapshot(args, servers))
    return 0


# An item entry's header: I<version> <fresh_until_ms>/<load_ms> (src/cache/redis.rs).
HEADER = re.compile(rb"^I\d+ \d+/(\d+) ")


def cmd_entries(args):
    r = Redis(args.redis_port)
    keys, cursor = [], b"0"
    while len(keys) < args.sample:
        r.send("SCAN", cursor, "MATCH", f"{args.prefix}item:*", "COUNT", "1000")
        cursor, batch = r.reply()
        keys.extend(batch)
        if cursor in (b"0", "0"):
            break
    keys = keys[: args.sample]
    for k in keys:
        r.send("GETRANGE", k, "0", "63")
    hist, other = {}, 0
    for _ in keys:
        m = HEADER.match(r.reply() or b"")
        if m:
            ms = int(m.group(1))
            hist[ms] = hist.get(ms, 0) + 1
        else:
            other += 1
    n = sum(hist.values())
    print(json.dumps({"sampled": len(keys), "load_ms": {str(k): v for k, v in sorted(hist.items())},
                      "load_ms_zero_share": round(hist.get(0, 0) / n, 4) if n else None,
                      "not_items": other}))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("snapshot", "monitor"):
        p = sub.add_parser(name)
        add_options(p, "--port")
        p.add_argument("--svc-pidfile")
        p.add_argument("--pg", action="append", help="NAME=PORT:PIDFILE (postmaster.pid)")
        p.add_argument("--redis-pidfile", help="Redis's pid: its CPU seconds too")
        add_options(p, "--out")
        if name == "snapshot":
            add_options(p, "--label")
        else:
            p.add_argument("--interval", type=float, default=1.0)
    p = sub.add_parser("entries")
    add_options(p, "--redis-port")
    p.add_argument("--prefix", default="itemcache:")
    p.add_argument("--sample", type=int, default=2000)
    return run_subcommand(ap, "cmd", {"snapshot": cmd_snapshot, "monitor": cmd_monitor, "entries": cmd_entries})


if __name__ == "__main__":
    sys.exit(main())
