#!/usr/bin/env python3
"""bench/fleet's tools: several instances sharing one Redis and one Postgres.

    fleet.py stampede --ports P1,P2,P3 --id ID [--concurrency 1000]
        N concurrent GET /items/{id}, connection i to port i mod #ports (round robin), all
        connections opened first, then every request written back to back (as
        stampede.py does for one port). One JSON object: statuses, X-Cache values, errors,
        the per-port split, how long the writing took, latency percentiles.
    fleet.py snapshot --label L --ports P1,P2 --svc-pidfiles F1,F2 [--nginx-pidfile F]
                      --pg PORT:PIDFILE --redis-pidfile F --out X.jsonl
        appends one JSON line: each instance's CPU seconds (utime + stime) and /metrics
        counters (leases by outcome, Postgres queries by label, cache lookups by result,
        coalesced reads, HTTP responses by status class), nginx's CPU (master and workers,
        reaped ones included), Postgres's (its whole process tree) and its statements on
        `items` (pg_stat_statements), Redis's CPU, and the machine's busy and total jiffies.
    fleet.py wrk --out FILE -- wrk ARGS...
        runs wrk, its output to FILE, then a line "WRKCPU {"cpu_s": ...}" (wrk's own CPU).
    fleet.py report RAW OUT.md
        the results (bench/results/fleet.md) from RAW's runs.jsonl, snapshots.jsonl,
        stampede-*.json and *.wrk.txt; also RAW/results.json.
"""

import argparse
import http.client
import json
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, add_options, append_jsonl, burst, command_after_dashes,  # noqa: E402
                    count_metrics, cpu_s, get_metrics, get_request, latency_ms, machine_jiffies,
                    read_jsonl, read_pid, run_subcommand, tally, tree_cpu_s)


# --- stampede ---------------------------------------------------------------------------


def listen_overflows():
    """The kernel's TcpExt ListenOverflows (SYNs dropped because an accept queue was full)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split()[1:], values.split()[1:]))["ListenOverflows"])
    return 0


def cmd_stampede(args):
    ports = [int(p) for p in args.ports.split(",")]
    # Connect in batches of 100, non-blocking, 50 ms apart: an instance's listen backlog is
    # 128 (Rust's std listener), and a burst of 1,000 SYNs at one instance overflows it on a
    # busy machine; the dropped SYNs are retried after 1 s, 3 s..., and connections accepted
    # more than 5 s before their request get actix's 408. The kernel's ListenOverflows
    # counter over the connect phase is reported (0: no SYN was dropped).
    overflows0 = listen_overflows()
    socks = []
    c0 = time.perf_counter()
    for start in range(0, args.concurrency, args.connect_batch):
        batch = []
        for i in range(start, min(start + args.connect_batch, args.concurrency)):
            port = ports[i % len(ports)]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            batch.append((s, port))
        sel = selectors.DefaultSelector()
        for s, _ in batch:
            sel.register(s, selectors.EVENT_WRITE)
        pending = len(batch)
        deadline = time.perf_counter() + 15
        while pending and time.perf_counter() < deadline:
            for key, _ in sel.select(timeout=1.0):
                err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect: {os.strerror(err)}")
                sel.unregister(key.fileobj)
                pending -= 1
        if pending:
            raise OSError(f"{pending} connections not established in 15 s")
        sel.close()
        socks.extend(batch)
        time.sleep(args.connect_pause)
    connect = time.perf_counter() - c0
    overflows = listen_overflows() - overflows0
    time.sleep(0.5)  # let every instance accept its connections before the burst
    for s, _ in socks:
        s.setblocking(True)
    requests = {p: get_request(f"/items/{args.id}", p) for p in ports}
    sent, results = burst([(s, requests[port]) for s, port in socks], args.timeout)

    port_of = dict(socks)
    statuses, caches, errors, lat = tally(results)
    per_port = {}
    for s, (status, cache, took) in results.items():
        pp = per_port.setdefault(str(port_of[s]), {"requests": 0, "errors": 0, "x_cache": {}})
        pp["requests"] += 1
        if status is None:
            pp["errors"] += 1
            continue
        pp["x_cache"][cache] = pp["x_cache"].get(cache, 0) + 1
        if status != 200:
            pp["errors"] += 1

    non_200 = sum(v for k, v in statuses.items() if k != "200")
    print(json.dumps({
        "id": args.id, "concurrency": args.concurrency, "ports": ports,
        "connect_ms": round(connect * 1000, 1), "listen_overflows": overflows, "send_spread_ms": round(sent * 1000, 2), "statuses": statuses, "x_cache": caches,
        "errors": sum(errors.values()) + non_200, "error_kinds": errors, "per_port": per_port,
        "latency_ms": latency_ms(lat),
    }))
    return 0


# --- snapshot ---------------------------------------------------------------------------


def scrape(port):
    text = get_metrics(port, timeout=5)
    out = {"leases": {}, "queries": {}, "lookups": {}, "coalesced": 0.0, "http": {}}
    rest = count_metrics(text, out, {
        "itemcache_leases_total": ("leases", "outcome"),
        "itemcache_db_query_duration_seconds_count": ("queries", "query"),
        "itemcache_cache_lookups_total": ("lookups", "result"),
        "itemcache_coalesced_requests_total": ("coalesced", None),
    })
    for name, labels, value in rest:
        if name == "itemcache_http_requests_total" and labels.get("route", "").startswith("/items"):
            k = labels.get("status", "?")[:1] + "xx"
            out["http"][k] = out["http"].get(k, 0) + value
    return out


def cmd_snapshot(args):
    import psycopg

    from probe import ITEMS_SQL

    snap = {"label": args.label, "t": round(time.time(), 3), "instances": []}
    busy, total = machine_jiffies()
    snap["machine"] = {"busy_s": busy / CLK_TCK, "total_s": total / CLK_TCK}
    ports = [int(p) for p in args.ports.split(",")] if args.ports else []
    pidfiles = args.svc_pidfiles.split(",") if args.svc_pidfiles else []
    for port, pidfile in zip(ports, pidfiles):
        pid = read_pid(pidfile)
        row = {"port": port, "pid": pid, "cpu_s": cpu_s(pid) if pid else None}
        try:
            row["metrics"] = scrape(port)
        except (OSError, http.client.HTTPException, ValueError) as e:
            row["error"] = str(e)
        snap["instances"].append(row)
    if args.nginx_pidfile:
        pid = read_pid(args.nginx_pidfile)
        snap["nginx_cpu_s"] = tree_cpu_s(pid) if pid else None
    if args.redis_pidfile:
        pid = read_pid(args.redis_pidfile)
        snap["redis_cpu_s"] = cpu_s(pid) if pid else None
    if args.pg:
        port, pidfile = args.pg.split(":", 1)
        pid = read_pid(pidfile)
        snap["pg_cpu_s"] = tree_cpu_s(pid) if pid else None
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/itemcache", autocommit=True,
                             connect_timeout=5) as db:
            calls, ms = db.execute(ITEMS_SQL).fetchone()
            snap["pg_items_calls"] = int(calls)
    with open(args.out, "a") as out:
        append_jsonl(out, snap)
    return 0


# --- wrk with its CPU ---------------------------------------------------------------------


def cmd_wrk(args):
    cmd = command_after_dashes(args.command)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(args.out, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(args.out, "a") as out:
        out.write("WRKCPU " + json.dumps({"cpu_s": round(cpu, 3), "rc": rc}) + "\n")
    return rc


# --- report -------------------------------------------------------------------------------


def wrk_result(path):
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("WRKJSON "):
                out.update(json.loads(line[8:]))
            elif line.startswith("WRKCPU "):
                out["wrk_cpu_s"] = json.loads(line[7:])["cpu_s"]
    return out


def sum_metric(snap, key, label=None):
    total = 0.0
    for inst in snap["instances"]:
        m = inst.get("metrics", {})
        if label is None:
            total += m.get(key, 0.0) if not isinstance(m.get(key), dict) else sum(m[key].values())
        else:
            total += m.get(key, {}).get(label, 0.0)
    return total


def delta(a, b, key, label=None):
    return sum_metric(b, key, label) - sum_metric(a, key, label)


def svc_cpu(snap):
    return sum(i["cpu_s"] or 0.0 for i in snap["instances"])


def outcomes(a, b):
    names = set()
    for s in (a, b):
        for inst in s["instances"]:
            names.update(inst.get("metrics", {}).get("leases", {}).keys())
    return {n: int(round(delta(a, b, "leases", n))) for n in sorted(names)}


def fmt(x, digits=0):
    if x is None:
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def span(values, digits=0):
    """'v' for one value; 'median (min–max)' for several."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(statistics.median(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def cmd_report(args):
    raw = args.raw
    meta = json.load(open(os.path.join(raw, "meta.json")))
    runs = read_jsonl(os.path.join(raw, "runs.jsonl"))
    snaps = {s["label"]: s for s in read_jsonl(os.path.join(raw, "snapshots.jsonl"))}
    results = {"meta": meta, "stampede": {}, "load": []}

    # Stampedes: per instance count, per id.
    for run in (r for r in runs if r["kind"] == "stampede"):
        a, b = snaps[run["name"] + ".before"], snaps[run["name"] + ".after"]
        client = json.load(open(os.path.join(raw, run["name"] + ".json")))
        row = {
            "id": run["id"],
            "pg_statements": b["pg_items_calls"] - a["pg_items_calls"],
            "svc_queries": int(round(delta(a, b, "queries"))),
            "svc_get_item": int(round(delta(a, b, "queries", "get_item"))),
            "leases": outcomes(a, b),
            "coalesced": int(round(delta(a, b, "coalesced"))),
            "errors": client["errors"],
            "statuses": client["statuses"],
            "x_cache": client["x_cache"],
            "send_spread_ms": client["send_spread_ms"],
            "connect_ms": client.get("connect_ms", 0),
            "listen_overflows": client.get("listen_overflows"),
            "latency_ms": client["latency_ms"],
            "per_port": client["per_port"],
        }
        results["stampede"].setdefault(str(run["instances"]), []).append(row)

    res_w = {}
    for name in sorted(os.listdir(raw)):
        if name.startswith("stampede-warmup.n") and name.endswith(".json"):
            res_w[name[len("stampede-warmup.n"):-5]] = json.load(open(os.path.join(raw, name)))
    results["warmup"] = res_w

    # Hit and miss-heavy loads.
    for run in (r for r in runs if r["kind"] in ("hit", "miss")):
        a, b = snaps[run["name"] + ".before"], snaps[run["name"] + ".after"]
        w = wrk_result(os.path.join(raw, run["name"] + ".wrk.txt"))
        n = w.get("requests", 0)
        secs = w.get("duration_us", 1) / 1e6
        wall = b["t"] - a["t"]
        lookups = {k: delta(a, b, "lookups", k) for k in ("hit", "miss", "stale", "bypass")}
        row = dict(run)
        row.update({
            "requests": n,
            "rps": n / secs if secs else None,
            "errors": sum(w.get("errors", {}).values()),
            "errors_by_kind": w.get("errors", {}),
            "latency_us": w.get("latency_us"),
            "svc_cpu_us_per_req": (svc_cpu(b) - svc_cpu(a)) / n * 1e6 if n else None,
            "svc_cpu_cores": (svc_cpu(b) - svc_cpu(a)) / wall,
            "svc_cpu_us_per_req_by_instance": [
                ((ib["cpu_s"] or 0) - (ia["cpu_s"] or 0)) / n * 1e6 if n else None
                for ia, ib in zip(a["instances"], b["instances"])],
            "nginx_cpu_us_per_req": ((b["nginx_cpu_s"] - a["nginx_cpu_s"]) / n * 1e6
                                     if run["path"] == "nginx" and n else None),
            "redis_cpu_us_per_req": (b["redis_cpu_s"] - a["redis_cpu_s"]) / n * 1e6 if n else None,
            "pg_cpu_us_per_req": (b["pg_cpu_s"] - a["pg_cpu_s"]) / n * 1e6 if n else None,
            "wrk_cpu_us_per_req": w.get("wrk_cpu_s", 0) / n * 1e6 if n else None,
            "machine_busy_cores": (b["machine"]["busy_s"] - a["machine"]["busy_s"]) / wall,
            "pg_statements_per_req": (b["pg_items_calls"] - a["pg_items_calls"]) / n if n else None,
            "svc_queries_per_req": delta(a, b, "queries") / n if n else None,
            "lookups": lookups,
            "hit_ratio": (lookups["hit"] / sum(lookups.values())) if sum(lookups.values()) else None,
            "leases": outcomes(a, b),
            "per_instance_requests": [
                sum(ib.get("metrics", {}).get("http", {}).values())
                - sum(ia.get("metrics", {}).get("http", {}).values())
                for ia, ib in zip(a["instances"], b["instances"])],
        })
        # CPU the machine spent on none of the measured processes (other work on the box).
        ours = (svc_cpu(b) - svc_cpu(a)) + (b["redis_cpu_s"] - a["redis_cpu_s"]) \
            + (b["pg_cpu_s"] - a["pg_cpu_s"]) + w.get("wrk_cpu_s", 0)
        if run["path"] == "nginx":
            ours += b["nginx_cpu_s"] - a["nginx_cpu_s"]
        row["other_cpu_cores"] = row["machine_busy_cores"] - ours / wall
        results["load"].append(row)

    with open(os.path.join(raw, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out, "w") as f:
        f.write(render(results))
    return 0


def render(res):
    meta = res["meta"]
    L = []
    L.append("# Fleet benchmark (`bench/fleet`)\n")
    if meta.get("built", 1):
        source = (f"commit `{meta['commit']}`"
                  f"{' + uncommitted changes in src/' if meta.get('dirty') else ''}")
    else:
        source = (f"`--no-build`: the release binary as found, built {meta.get('binary_mtime')} "
                  f"(HEAD `{meta['commit']}` at the run)")
    L.append(f"Run {meta['started_utc']} ({meta['mode']}), {source}; "
             f"{meta['nproc']} cores ({meta['cpu_model']}), {meta['items']:,} items. "
             "Everything on the same 2 cores: the instances, nginx, Redis, Postgres and the load "
             "generator. Every instance runs with `CACHE_VERIFY_SAMPLE=0` (no sampled re-reads, so "
             "every Postgres statement on `items` is a load). Raw outputs: "
             f"`bench/results/raw/{os.path.basename(meta['raw'])}/`.\n")

    # --- stampede
    L.append("## Stampede: 1,000 concurrent requests for one cold id\n")
    L.append(f"Connection i goes to instance i mod N (round robin, straight to the instances); all "
             f"1,000 connections are opened first (100 at a time, 50 ms apart, so that no "
             f"instance's 128-connection listen backlog overflows), then every request is written "
             f"back to back. "
             f"{meta['stampede_ids']} different cold ids per fleet size (never read before). "
             "Postgres statements on `items` from `pg_stat_statements` on the private Postgres; "
             "the instances' own count (`itemcache_db_query_duration_seconds_count`, all labels) "
             "beside it. Target: 1 query, 0 errors.\n")
    L.append("| instances | cold ids | Postgres statements per cold id: min / mean / max | "
             "service queries per id: min / mean / max | errors (all ids) | X-Cache (all ids) | "
             "leases_total by outcome (all ids) | SYNs dropped while connecting (all ids) | "
             "connecting (max) / writing 1,000 requests (median) | "
             "p99 / max latency (median over ids) | target |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in sorted(res["stampede"], key=int):
        rows = res["stampede"][n]
        pg = [r["pg_statements"] for r in rows]
        sv = [r["svc_queries"] for r in rows]
        errs = sum(r["errors"] for r in rows)
        xc = {}
        leases = {}
        for r in rows:
            for k, v in r["x_cache"].items():
                xc[k] = xc.get(k, 0) + v
            for k, v in r["leases"].items():
                leases[k] = leases.get(k, 0) + v
        met = "met" if max(pg) == 1 and min(pg) == 1 and errs == 0 else "missed"
        L.append(
            f"| {n} | {len(rows)} | {min(pg)} / {statistics.mean(pg):.2f} / {max(pg)} | "
            f"{min(sv)} / {statistics.mean(sv):.2f} / {max(sv)} | {errs} | "
            f"{', '.join(f'{k} {v:,}' for k, v in sorted(xc.items()))} | "
            f"{', '.join(f'{k} {v}' for k, v in leases.items()) or 'none'} | "
            f"{sum(r.get('listen_overflows') or 0 for r in rows)} | "
            f"{max(r['connect_ms'] for r in rows):,.0f} / {statistics.median(r['send_spread_ms'] for r in rows):.1f} ms | "
            f"{statistics.median(r['latency_ms']['p99'] for r in rows):.0f} / "
            f"{statistics.median(r['latency_ms']['max'] for r in rows):.0f} ms | {met} |")
    L.append("")
    for n in sorted(res["stampede"], key=int):
        rows = res["stampede"][n]
        overlap = sum(1 for r in rows if r["leases"].get("filled", 0) > 0)
        late = sum(1 for r in rows if r["x_cache"].get("HIT", 0) >= 0.99 * sum(r["x_cache"].values()))
        coalesced = sum(1 for r in rows if r["coalesced"] >= 100)
        L.append(f"With {n} instance{'s' if n != '1' else ''}: {coalesced} of {len(rows)} ids had 100 or "
                 f"more requests coalesced behind a load in progress (`itemcache_coalesced_requests_total`); "
                 + (f"{overlap} of {len(rows)} had an instance wait on another's lease and answer from its "
                    f"fill (`leases_total{{outcome=\"filled\"}}` > 0); " if n != "1" else "")
                 + f"{late} of {len(rows)} were answered 99 % or more as HITs (the load and fill finished "
                 f"before most requests were read: the burst was not tight enough to test coalescing "
                 f"on those ids, only that nothing after the fill reached Postgres).\n")
    for n, w in sorted(res.get("warmup", {}).items()):
        L.append(f"Warm-up burst before the {n}-instance ids (not counted; a fresh fleet's first "
                 f"1,000 connections): connecting took {w['connect_ms']:,.0f} ms, "
                 f"{w['errors']} errors ({', '.join(f'{k}: {v}' for k, v in w['statuses'].items())}), "
                 f"Postgres statements not counted.\n")
    L.append("Per id (Postgres statements; leases acquired/filled/released/gave_up; X-Cache MISS/HIT):\n")
    L.append("| instances | id | statements | leases a/f/r/g | MISS / HIT | coalesced | errors |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sorted(res["stampede"], key=int):
        for r in res["stampede"][n]:
            le = r["leases"]
            L.append(f"| {n} | {r['id']} | {r['pg_statements']} | "
                     f"{le.get('acquired', 0)}/{le.get('filled', 0)}/{le.get('released', 0)}/"
                     f"{le.get('gave_up', 0)} | {r['x_cache'].get('MISS', 0)} / {r['x_cache'].get('HIT', 0)} | "
                     f"{r['coalesced']} | {r['errors']} |")
    L.append("")

    # --- load runs
    def table(kind, title, extra):
        rows = [r for r in res["load"] if r["kind"] == kind]
        if not rows:
            return
        L.append(title)
        head = ("| instances | path | rounds | req/s | service CPU µs/req | nginx CPU µs/req | "
                "Redis CPU µs/req | Postgres CPU µs/req | wrk CPU µs/req | errors |")
        sep = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        if kind == "miss":
            head += " hit ratio | Postgres statements/req | leases acquired/req |"
            sep += " --- | --- | --- |"
        head += " machine busy (cores) | other work (cores) |"
        sep += " --- | --- |"
        L.append(head)
        L.append(sep)
        groups = {}
        for r in rows:
            groups.setdefault((r["instances"], r["path"]), []).append(r)
        for (n, path), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            line = (f"| {n} | {'nginx' if path == 'nginx' else 'direct'} | {len(rs)} | "
                    f"{span([r['rps'] for r in rs])} | {span([r['svc_cpu_us_per_req'] for r in rs], 1)} | "
                    f"{span([r['nginx_cpu_us_per_req'] for r in rs], 1)} | "
                    f"{span([r['redis_cpu_us_per_req'] for r in rs], 1)} | "
                    f"{span([r['pg_cpu_us_per_req'] for r in rs], 1)} | "
                    f"{span([r['wrk_cpu_us_per_req'] for r in rs], 1)} | {sum(r['errors'] for r in rs)} |")
            if kind == "miss":
                acq = [r["leases"].get("acquired", 0) / r["requests"] for r in rs if r["requests"]]
                line += (f" {span([r['hit_ratio'] for r in rs], 3)} | "
                         f"{span([r['pg_statements_per_req'] for r in rs], 3)} | {span(acq, 3)} |")
            line += (f" {span([r['machine_busy_cores'] for r in rs], 2)} | "
                     f"{span([r['other_cpu_cores'] for r in rs], 2)} |")
            L.append(line)
        L.append("")
        L.append(extra)
        L.append("")

    conns = meta["conns"]
    table("hit", f"## Hit path, 1 → 3 instances, {conns} connections\n\n"
          f"Ids 1..{meta['hot']:,} cached (uniform), `wrk -t 3 -c {conns}`, {meta['measure_s']} s "
          f"measured after {meta['warmup_s']} s of warm-up, per round; rounds alternate 1 and 3 "
          "instances. *direct*: wrk's 3 threads on the instances (thread t on instance t mod N, "
          f"{conns // 3} connections each); *nginx*: all through the private nginx "
          "(`deploy/render-nginx-conf`, 2 workers, access log on), round robin over the instances. "
          "Values: median (min–max) over the rounds. Service CPU is the sum of the instances' "
          "utime + stime (/proc) over the run, divided by the requests wrk completed.\n",
          "Requests/s are for context only: every process shares the same 2 cores, so more "
          "instances cannot add capacity here; compare CPU per request.")
    table("miss", f"## Miss-heavy: uniform over all {meta['items']:,} ids, `CACHE_TTL_SECS={meta['miss_ttl']}`, "
          f"`CACHE_SWR_SECS=0`, {conns} connections\n\n"
          "The same runs (`FLUSHALL` before each fleet) with entries fresh for about a second: "
          "nearly every read misses, takes a lease, loads and fills. Postgres statements on "
          "`items` per request from `pg_stat_statements`.\n",
          "")
    L.append("## Machine\n")
    L.append(f"Busy fraction of the 2 cores in the 3 s before the run: {meta['busy_before']}; "
             f"build/test processes running at the start: {meta['busy_procs'] or 'none'}. "
             "`other work` in the tables is the machine's busy CPU over each run minus what the "
             "measured processes (instances, nginx, Redis, Postgres, wrk) used: another "
             "session's work on the box.\n")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stampede")
    p.add_argument("--ports", required=True)
    add_options(p, "--id", "--concurrency")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--connect-batch", type=int, default=100)
    p.add_argument("--connect-pause", type=float, default=0.05)
    p = sub.add_parser("snapshot")
    add_options(p, "--label")
    p.add_argument("--ports", default="")
    p.add_argument("--svc-pidfiles", default="")
    p.add_argument("--nginx-pidfile")
    p.add_argument("--redis-pidfile")
    p.add_argument("--pg", help="PORT:PIDFILE (postmaster.pid)")
    add_options(p, "--out")
    p = sub.add_parser("wrk")
    add_options(p, "--out")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("report")
    p.add_argument("raw")
    p.add_argument("out")
    return run_subcommand(ap, "cmd", {"stampede": cmd_stampede, "snapshot": cmd_snapshot, "wrk": cmd_wrk,
                                      "report": cmd_report})


if __name__ == "__main__":
    sys.exit(main())
