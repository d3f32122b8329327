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
import signal
import socket
import sys
import time

import psycopg

CLK_TCK = os.sysconf("SC_CLK_TCK")
LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

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

stop = False


def on_term(*_):
    global stop
    stop = True


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def read_pid(pidfile):
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def cpu_s(pid):
    try:
        f = stat_fields(pid)
        return (int(f[11]) + int(f[12])) / CLK_TCK
    except OSError:
        return None


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


def tree_cpu_s(parent):
    """A server's CPU seconds: the parent's own and its reaped children's (cutime, cstime),
    plus every live child's. Continuous as backends come and go."""
    try:
        f = stat_fields(parent)
    except OSError:
        return None
    total = sum(int(x) for x in f[11:15])
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            g = stat_fields(int(name))
        except OSError:
            continue
        if int(g[1]) == parent:
            total += int(g[11]) + int(g[12])
    return total / CLK_TCK


def scrape(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {"lookups": {}, "db_reads": {}, "fallbacks": {}, "queries": {}, "coalesced": 0.0}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))
        if name == "itemcache_cache_lookups_total":
            out["lookups"][labels.get("result", "")] = value
        elif name == "itemcache_db_reads_total":
            out["db_reads"][labels.get("target", "")] = value
        elif name == "itemcache_replica_fallbacks_total":
            out["fallbacks"][labels.get("reason", "")] = value
        elif name == "itemcache_db_query_duration_seconds_count":
            out["queries"][labels.get("query", "")] = value
        elif name == "itemcache_coalesced_requests_total":
            out["coalesced"] = value
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
        out.write(json.dumps(snapshot(args, servers, args.label), separators=(",", ":")) + "\n")
    return 0


def cmd_monitor(args):
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    servers = Servers(args.pg)
    next_t = time.time()
    with open(args.out, "a", buffering=1) as out:
        while not stop:
            out.write(json.dumps(snapshot(args, servers), separators=(",", ":")) + "\n")
            next_t += args.interval
            delay = next_t - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.time()
    return 0


class Redis:
    """A bare RESP client on one connection, pipelined."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, *args):
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(parts))

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")


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
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--svc-pidfile")
        p.add_argument("--pg", action="append", help="NAME=PORT:PIDFILE (postmaster.pid)")
        p.add_argument("--redis-pidfile", help="Redis's pid: its CPU seconds too")
        p.add_argument("--out", required=True)
        if name == "snapshot":
            p.add_argument("--label", required=True)
        else:
            p.add_argument("--interval", type=float, default=1.0)
    p = sub.add_parser("entries")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--prefix", default="itemcache:")
    p.add_argument("--sample", type=int, default=2000)
    args = ap.parse_args()
    return {"snapshot": cmd_snapshot, "monitor": cmd_monitor, "entries": cmd_entries}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
