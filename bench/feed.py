#!/usr/bin/env python3
"""The change-feed scenario's tools (bench/run step 9): writes made straight to Postgres,
not through the service, and how soon and how completely the service's change feed
applies them to the cache.

    feed.py monitor --svc-pidfile F --port P --dsn URL [--pg-pid N] [--redis-pidfile F] --out X.jsonl
        every 0.1 s until SIGTERM: the service's RSS and CPU seconds, Postgres's and Redis's
        CPU seconds, Redis's RSS, the queue's length read from Postgres, and the service's
        itemcache_change_feed_backlog / _applied_total from /metrics
    feed.py scrape --port P
        one JSON object: the feed's metrics now (invalidation lag histogram by source,
        backlog gauge, applied counter); bench/analyze.py takes deltas of two scrapes
    feed.py lag --port P --redis-port R --dsn URL --first-id N --rate 20 --seconds S
        the lag, measured per write: cache an id (GET, then GET again: HIT), commit an
        UPDATE of it straight to Postgres, then ask Redis every ~0.3 ms (EXISTS) until the
        id's entry is gone: the feed applied the change. Upper bound:
        commit returned -> first "gone" reply received; lower bound: -> the last "present"
        request sent. Then one GET, which must show the new version (its time from the
        commit is reported too). One write every 1/rate s, each on a new id from --first-id up.
    feed.py drained --dsn URL [--timeout S]
        waits until the queue (item_changes) is empty; prints the seconds waited
    feed.py check --port P --dsn URL (--ids A-B | --ids-file F)
        GETs every id and compares its version with Postgres's: the stale entries
    feed.py bulk --port P --dsn URL --svc-pidfile F --items N --warm 1000 [--seed S]
        VACUUMs and CHECKPOINTs, caches --warm random ids (checked HITs), runs UPDATE items
        SET price_cents = price_cents + 1 over every row (timed: statement, commit), waits until the feed has
        emptied the queue (polled every 50 ms), reads the service's CPU seconds at the commit
        and at the drain, then checks the warmed ids (0 stale expected)
    feed.py bulk-compare --dsn URL [--rounds 2]
        the same UPDATE with the feed's trigger (items_record_updates) disabled and with every
        trigger on, alternated, --rounds times each; each after a VACUUM and a CHECKPOINT, and
        rolled back (so each finds the table in the same state, nothing reaches the queue,
        and the rollback restores the trigger's setting). What the feed costs a write = with
        / without (the fastest of each).

Times are wall-clock (time.time()) where bench/analyze.py matches them with the phases and
the monitor, and time.perf_counter() differences for durations. Needs psycopg (3).
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import sys
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Redis, Stop, add_options, append_jsonl, cpu_s, get_metrics,  # noqa: E402
                    metric_samples, read_pid, rss_kib, run_subcommand, ticks, tree_cpu_s)

# The queue's length as the service reports it: the span of queued sequence numbers (two
# index lookups however long the queue is; src/feed/changes.rs `backlog`).
BACKLOG_SQL = "SELECT coalesce(max(seq) - min(seq) + 1, 0)::bigint FROM item_changes"


# --- the service ------------------------------------------------------------------------


def scrape(port, timeout=2.0):
    """The feed's metrics: lag histograms by source, backlog gauge, applied counter."""
    text = get_metrics(port, timeout)
    lag = {}
    out = {"t": time.time(), "lag": lag, "backlog": None, "applied": 0.0, "follower": {}}
    for name, labels, value in metric_samples(text):
        if name.startswith("itemcache_invalidation_lag_seconds"):
            h = lag.setdefault(labels.get("source", ""), {"buckets": {}, "sum": 0.0, "count": 0.0})
            if name.endswith("_bucket"):
                h["buckets"][labels["le"]] = value
            elif name.endswith("_sum"):
                h["sum"] = value
            elif name.endswith("_count"):
                h["count"] = value
        elif name == "itemcache_change_feed_backlog":
            out["backlog"] = value
        elif name == "itemcache_change_feed_applied_total":
            out["applied"] = value
        elif name == "itemcache_change_feed_follower":
            out["follower"][labels.get("state", "")] = value
    return out


class Http:
    """One keep-alive connection to the service."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def get(self, path):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.connect()
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                body = r.read()
                return r.status, r.getheader("X-Cache"), body
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def item(self, item_id):
        """(status, X-Cache, version or None)."""
        status, xcache, body = self.get(f"/items/{item_id}")
        version = json.loads(body)["version"] if status == 200 else None
        return status, xcache, version


def pct(values, q):
    """Nearest-rank percentile (q in 0..100) of a list; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summary_ms(values):
    if not values:
        return None
    return {"n": len(values), **{f"p{q}": round(pct(values, q) * 1000, 3) for q in (50, 90, 95, 99)},
            "max": round(max(values) * 1000, 3), "mean": round(statistics.fmean(values) * 1000, 3)}


# --- commands -----------------------------------------------------------------------------


def cmd_monitor(args):
    stop = Stop()
    db = None
    with open(args.out, "a", buffering=1) as out:
        for _ in ticks(args.interval, stop):
            s = {"t": round(time.time(), 3)}
            pid = read_pid(args.svc_pidfile)
            if pid:
                s["pid"] = pid
                s["rss_kib"] = rss_kib(pid)
                s["cpu_s"] = cpu_s(pid)
            if args.pg_pid:
                s["pg_cpu_s"] = tree_cpu_s(args.pg_pid)
            rpid = read_pid(args.redis_pidfile) if args.redis_pidfile else None
            if rpid:
                s["redis_cpu_s"] = cpu_s(rpid)
                s["redis_rss_kib"] = rss_kib(rpid)
            try:
                if db is None:
                    db = psycopg.connect(args.dsn, autocommit=True, connect_timeout=2)
                s["queue"] = db.execute(BACKLOG_SQL).fetchone()[0]
            except psycopg.Error:
                db = None
            if pid:
                try:
                    m = scrape(args.port, timeout=0.5)
                    s["backlog_gauge"] = m["backlog"]
                    s["applied"] = m["applied"]
                except (OSError, http.client.HTTPException, ValueError):
                    pass
            append_jsonl(out, s)
    return 0


def cmd_scrape(args):
    print(json.dumps(scrape(args.port)))
    return 0


def cmd_lag(args):
    """Per write: cache an id, commit an UPDATE of it, then ask Redis (EXISTS on the id's
    entry, every ~0.3 ms) until the entry is gone: the feed has applied the change. Then one
    GET, which must show the new version."""
    svc = Http(args.port)
    db = psycopg.connect(args.dsn, autocommit=True)
    rd = Redis(args.redis_port, nodelay=True)  # TCP_NODELAY: each EXISTS is a timed round trip
    samples, not_cached, timeouts, stale_reads = [], 0, 0, 0
    redis_rtt = []
    item_id = args.first_id
    key_prefix = None
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    k = 0
    while True:
        due = t0 + k / args.rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        if time.perf_counter() >= deadline:
            break
        k += 1
        item_id += 1
        # Cached before the write: the second read must be a HIT.
        svc.item(item_id)
        status, xcache, old = svc.item(item_id)
        if key_prefix is None and status == 200:
            # The entry's key, "<CACHE_KEY_PREFIX>item:<id>" (src/cache/redis.rs), found once.
            found = [x.decode() for x in rd.call("KEYS", f"*item:{item_id}")]
            found = [x for x in found if x.endswith(f"item:{item_id}")]
            if len(found) != 1:
                raise SystemExit(f"feed.py lag: cannot find the cache entry of id {item_id} in Redis: {found}")
            key_prefix = found[0][: -len(str(item_id))]
        key = f"{key_prefix}{item_id}"
        if status != 200 or xcache != "HIT" or rd.call("EXISTS", key) != 1:
            not_cached += 1
            continue
        new = db.execute("UPDATE items SET price_cents = price_cents + 1 WHERE id = %s RETURNING version",
                         (item_id,)).fetchone()[0]
        committed = time.perf_counter()
        last_present_sent = None
        polls = 0
        while True:
            polls += 1
            sent = time.perf_counter()
            present = rd.call("EXISTS", key)
            got = time.perf_counter()
            redis_rtt.append(got - sent)
            if not present:
                break
            last_present_sent = sent
            if got - committed > args.timeout:
                break
            time.sleep(0.0002)  # ~0.3 ms between asks: fine enough, and no busy loop on 2 cores
        if present:
            timeouts += 1
            continue
        status, xcache, version = svc.item(item_id)
        read = time.perf_counter()
        if status != 200 or version is None or version < new:
            stale_reads += 1
        samples.append({
            "id": item_id,
            "t": round(time.time(), 3),
            "upper_s": got - committed,
            "lower_s": max(0.0, last_present_sent - committed) if last_present_sent is not None else 0.0,
            "read_s": read - committed,
            "polls": polls,
            "x_cache": xcache,
            "old_version": old,
            "new_version": new,
            "read_version": version,
        })
    elapsed = time.perf_counter() - t0
    xc = {}
    for s in samples:
        xc[s["x_cache"]] = xc.get(s["x_cache"], 0) + 1
    doc = {
        "method": "per write: commit an UPDATE straight to Postgres, then EXISTS on the id's cache entry in Redis "
                  "every ~0.3 ms until it is gone (upper bound: commit returned -> first 'gone' reply received; "
                  "lower bound: -> last 'present' request sent); then one GET, which must show the new version",
        "rate": args.rate,
        "seconds": round(elapsed, 2),
        "writes": len(samples) + timeouts,
        "samples": len(samples),
        "not_cached_before_write": not_cached,
        "timeouts": timeouts,
        "timeout_s": args.timeout,
        "stale_reads_after_invalidation": stale_reads,
        "read_after_x_cache": xc,
        "upper_ms": summary_ms([s["upper_s"] for s in samples]),
        "lower_ms": summary_ms([s["lower_s"] for s in samples]),
        "read_ms": summary_ms([s["read_s"] for s in samples]),
        "redis_rtt_ms": summary_ms(redis_rtt),
        "polls": len(redis_rtt),
        "series": [{**s, **{f: round(s[f], 6) for f in ("upper_s", "lower_s", "read_s")}} for s in samples],
    }
    with open(args.out, "w") as f:
        json.dump(doc, f)
    u = doc["upper_ms"] or {}
    print(f"lag sampler: {len(samples)} writes, commit -> entry gone p50 {u.get('p50')} ms, p99 {u.get('p99')} ms, "
          f"max {u.get('max')} ms; {timeouts} timeouts, {not_cached} not cached first, {stale_reads} stale reads after",
          file=sys.stderr)
    return 0


def wait_drained(db, timeout, poll=0.05):
    """Seconds until the queue is empty (None on timeout), and the largest length seen."""
    t0 = time.perf_counter()
    most = 0
    while True:
        n = db.execute(BACKLOG_SQL).fetchone()[0]
        most = max(most, n)
        if n == 0:
            return time.perf_counter() - t0, most
        if time.perf_counter() - t0 > timeout:
            return None, most
        time.sleep(poll)


def cmd_drained(args):
    db = psycopg.connect(args.dsn, autocommit=True)
    took, most = wait_drained(db, args.timeout)
    print(json.dumps({"drained_after_s": None if took is None else round(took, 3), "queue_max": most}))
    return 0 if took is not None else 1


def check(svc, db, ids):
    """GET every id; compare with Postgres's version."""
    versions = dict(db.execute("SELECT id, version FROM items WHERE id = ANY(%s)", (list(ids),)).fetchall())
    stale, xc, bad, served = [], {}, 0, {}
    for i in ids:
        status, xcache, version = svc.item(i)
        served[i] = version
        xc[xcache] = xc.get(xcache, 0) + 1
        if status != 200:
            bad += 1
            continue
        if version != versions.get(i):
            stale.append({"id": i, "served": version, "postgres": versions.get(i)})
    return {"checked": len(ids), "stale": len(stale), "stale_examples": stale[:10], "non_200": bad, "x_cache": xc,
            "served": served}


def parse_ids(spec, path):
    if path:
        return [int(x) for x in open(path).read().split()]
    a, b = spec.split("-")
    return list(range(int(a), int(b) + 1))


def cmd_check(args):
    doc = check(Http(args.port), psycopg.connect(args.dsn, autocommit=True), parse_ids(args.ids, args.ids_file))
    del doc["served"]
    print(json.dumps(doc))
    return 0


def cmd_bulk(args):
    svc = Http(args.port)
    db = psycopg.connect(args.dsn, autocommit=True)
    doc = {"items": args.items}

    doc["prepare_s"] = quiesce(db)
    if db.execute(BACKLOG_SQL).fetchone()[0]:
        raise SystemExit("feed.py bulk: item_changes is not empty before the bulk UPDATE")

    # Cache --warm random ids, then check each is a HIT.
    ids = sorted(random.Random(args.seed).sample(range(1, args.items + 1), min(args.warm, args.items)))
    for a in range(0, len(ids), 100):
        status, _, body = svc.get("/items?ids=" + ",".join(str(i) for i in ids[a:a + 100]))
        if status != 200:
            raise SystemExit(f"feed.py bulk: warming failed: {status} {body[:200]!r}")
    before = {}
    hits = 0
    for i in ids:
        _, xcache, version = svc.item(i)
        hits += xcache == "HIT"
        before[i] = version
    doc["warmed"] = {"ids": len(ids), "hits_before": hits}

    svc_pid = read_pid(args.svc_pidfile)
    doc["rss_kib_before"] = rss_kib(svc_pid)
    doc["t_update_start"] = time.time()
    t = time.perf_counter()
    with db.transaction():
        cur = db.execute("UPDATE items SET price_cents = price_cents + 1")
        rows = cur.rowcount
        t_c = time.perf_counter()
        stmt = t_c - t
    commit = time.perf_counter() - t_c
    committed = time.perf_counter()
    doc["t_commit"] = time.time()
    cpu0 = cpu_s(svc_pid)
    doc["rows"] = rows
    doc["update_statement_s"] = round(stmt, 3)
    doc["commit_s"] = round(commit, 3)
    doc["update_s"] = round(stmt + commit, 3)
    doc["queue_after_commit"] = db.execute(BACKLOG_SQL).fetchone()[0]

    took, most = wait_drained(db, args.timeout)
    drained = time.perf_counter()
    cpu1 = cpu_s(svc_pid)
    doc["t_drained"] = time.time()
    doc["drained"] = took is not None
    doc["drain_s"] = round(drained - committed, 3) if took is not None else None
    doc["drain_poll_s"] = 0.05
    doc["queue_max"] = most
    doc["service_cpu_s_drain"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
    doc["drain_rows_per_s"] = round(rows / doc["drain_s"]) if doc["drain_s"] else None

    # Every warmed entry must be gone (or its refill refused): each read shows the new row.
    c = check(svc, db, ids)
    # The UPDATE bumped every version by one: reads must show exactly the warmed one + 1.
    c["served_warmed_version"] = sum(1 for i in ids if c["served"].get(i) == before.get(i))
    c["served_warmed_plus_1"] = sum(1 for i in ids if before.get(i) is not None and c["served"].get(i) == before[i] + 1)
    del c["served"]
    doc["check"] = c
    time.sleep(2)
    doc["rss_kib_after_2s"] = rss_kib(svc_pid)
    doc["t_end"] = time.time()
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"bulk: UPDATE of {rows} rows {doc['update_s']} s; drained {doc['drain_s']} s after the commit; "
          f"service CPU {doc['service_cpu_s_drain']} s; stale {c['stale']} of {c['checked']}", file=sys.stderr)
    return 0 if doc["drained"] else 1


def quiesce(db):
    """The same starting point for every timed UPDATE: no dead rows for autovacuum to come
    for mid-run, and a checkpoint just taken (each run then writes a full page image of
    every page it first touches, the same amount of WAL)."""
    t = time.perf_counter()
    db.execute("VACUUM items")
    db.execute("VACUUM item_changes")
    db.execute("CHECKPOINT")
    return round(time.perf_counter() - t, 2)


def cmd_bulk_compare(args):
    db = psycopg.connect(args.dsn, autocommit=True)
    # Alternated, twice each: a drift (autovacuum, another process) shows as a spread.
    variants = {"without_feed_trigger": "items_record_updates", "with_triggers": None}
    order = ["without_feed_trigger", "with_triggers"] * args.rounds
    runs = []
    for name in order:
        trig = variants[name]
        prep = quiesce(db)
        db.execute("BEGIN")
        try:
            if trig:
                db.execute(f"ALTER TABLE items DISABLE TRIGGER {trig}")
            t = time.perf_counter()
            cur = db.execute("UPDATE items SET price_cents = price_cents + 1")
            stmt = time.perf_counter() - t
            rows = cur.rowcount
        finally:
            db.execute("ROLLBACK")
        runs.append({"variant": name, "disabled": trig, "rows": rows, "update_statement_s": round(stmt, 3),
                     "prepare_s": prep, "queued_changes_after_rollback": db.execute(BACKLOG_SQL).fetchone()[0]})
        print(f"bulk {name}: UPDATE of {rows} rows {stmt:.3f} s (rolled back)", file=sys.stderr)
    doc = {"runs": runs}
    for name in variants:
        times = [r["update_statement_s"] for r in runs if r["variant"] == name]
        doc[name] = {"update_statement_s": min(times), "all_s": times, "disabled": variants[name]}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("monitor")
    p.add_argument("--svc-pidfile", required=True)
    add_options(p, "--port", "--dsn")
    p.add_argument("--pg-pid", type=int)
    p.add_argument("--redis-pidfile")
    p.add_argument("--interval", type=float, default=0.1)
    add_options(p, "--out")
    p = sub.add_parser("scrape")
    add_options(p, "--port")
    p = sub.add_parser("lag")
    add_options(p, "--port", "--redis-port", "--dsn")
    p.add_argument("--first-id", type=int, required=True)
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    add_options(p, "--out")
    p = sub.add_parser("drained")
    add_options(p, "--dsn")
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("check")
    add_options(p, "--port", "--dsn")
    p.add_argument("--ids")
    p.add_argument("--ids-file")
    p = sub.add_parser("bulk")
    add_options(p, "--port", "--dsn")
    p.add_argument("--svc-pidfile", required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--warm", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--timeout", type=float, default=600)
    add_options(p, "--out")
    p = sub.add_parser("bulk-compare")
    add_options(p, "--dsn")
    p.add_argument("--rounds", type=int, default=2)
    add_options(p, "--out")
    return run_subcommand(ap, "command", {
        "monitor": cmd_monitor, "scrape": cmd_scrape, "lag": cmd_lag, "drained": cmd_drained,
        "check": cmd_check, "bulk": cmd_bulk, "bulk-compare": cmd_bulk_compare})


if __name__ == "__main__":
    sys.exit(main())
