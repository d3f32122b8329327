"""Results of bench/run steps 10-13, for bench/analyze.py: lookups by name beside lookups
by id (issue 16), the miss path on a read replica vs the primary (issue 13), early
refresh across several short TTLs (issue 14), and the miss path and batch targets with
their references (issue 15, `--only misspath`). Each reads what bench/probe.py recorded:
snapshots around each measured run (RAW/probe.jsonl) or a per-second series
(RAW/refresh-{with,without}.jsonl).

    results(raw, phases, runs, settings) -> {"names": ..., "replica": ..., "refresh": ...}
    misspath_results(raw, phases, runs, refs, meta), misspath_targets(mp)   (step 13)
    targets(res)   -> rows for the targets table
    markdown(res)  -> Markdown lines
    plots(res, out) -> OUT/refresh.png
"""

import json
import os
import re
import statistics

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import read_jsonl  # noqa: E402  (bench/common.py)


def _jsonl(path):
    return read_jsonl(path) if os.path.exists(path) else []


def _json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _d(a, b, *path):
    """b - a at path (None when either lacks it)."""
    for p in path:
        a = (a or {}).get(p)
        b = (b or {}).get(p)
    if a is None or b is None:
        return None
    return b - a


def _dmap(a, b, *path):
    """Deltas of a {label: counter} map."""
    for p in path:
        a = (a or {}).get(p) or {}
        b = (b or {}).get(p) or {}
    return {k: round(b.get(k, 0) - a.get(k, 0)) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def _per(v, n, scale=1.0, digits=1):
    return round(v / n * scale, digits) if v is not None and n else None


def _fmt(v, digits=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def window_counts(snaps, name, run):
    """Counters over one measured run: the snapshots labelled NAME.before and NAME.after."""
    by = {s.get("label"): s for s in snaps}
    a, b = by.get(f"{name}.before"), by.get(f"{name}.after")
    if not a or not b:
        return None
    req = run["requests"] if run else None
    out = {
        "seconds": round(b["t"] - a["t"], 2),
        "requests": req,
        "service_cpu_s": _d(a, b, "svc_cpu_s"),
        "lookups": _dmap(a, b, "metrics", "lookups"),
        "db_reads": _dmap(a, b, "metrics", "db_reads"),
        "fallbacks": _dmap(a, b, "metrics", "fallbacks"),
        "queries": _dmap(a, b, "metrics", "queries"),
        "coalesced": _d(a, b, "metrics", "coalesced"),
        "redis_cpu_s": _d(a, b, "redis_cpu_s"),
        "service_ctxsw": _d(a, b, "svc_ctxsw"),
        "pg": {},
    }
    for server in (b.get("pg") or {}):
        out["pg"][server] = {
            "cpu_s": _d(a, b, "pg", server, "cpu_s"),
            "items_calls": _d(a, b, "pg", server, "items_calls"),
            "items_exec_ms": _d(a, b, "pg", server, "items_exec_ms"),
            "all_calls": _d(a, b, "pg", server, "all_calls"),
            "ctxsw": _d(a, b, "pg", server, "ctxsw"),
        }
    out["service_us_per_req"] = _per(out["service_cpu_s"], req, 1e6)
    out["postgres_us_per_req"] = _per(sum(v["cpu_s"] or 0 for v in out["pg"].values()), req, 1e6)
    out["redis_us_per_req"] = _per(out["redis_cpu_s"], req, 1e6)
    out["service_ctxsw_per_req"] = _per(out["service_ctxsw"], req, digits=2)
    if out["pg"] and all(v.get("ctxsw") is not None for v in out["pg"].values()):
        out["postgres_ctxsw_per_req"] = _per(sum(v["ctxsw"] for v in out["pg"].values()), req, digits=2)
    out["statements_per_req"] = _per(sum(v["items_calls"] or 0 for v in out["pg"].values()), req, digits=3)
    if all(v.get("all_calls") is not None for v in out["pg"].values()) and out["pg"]:
        out["all_statements_per_req"] = _per(sum(v["all_calls"] for v in out["pg"].values()), req, digits=3)
    out["lookups_per_req"] = _per(sum(out["lookups"].values()), req, digits=3)
    return out


# --- (10) names ------------------------------------------------------------------------------


NAME_KINDS = [("hit.c1", "hit, 1 connection"), ("hit.c64", "hit, 64 connections"),
              ("cold.c16", "miss + fill (name and item cold), 16 connections"),
              ("bypass.c16", "BYPASS (CACHE_ENABLED=false), 16 connections")]


def names_results(raw, runs, snaps):
    rows = []
    for kind, label in NAME_KINDS:
        row = {"kind": kind, "label": label}
        for by in ("id", "name"):
            name = f"names.{by}.{kind}"
            r = runs.get(name)
            if not r:
                continue
            row[by] = {"rps": r["rps"], "latency_ms": r["latency_ms"], "errors": r["errors"],
                       **(window_counts(snaps, name, r) or {})}
        if "id" in row or "name" in row:
            i, n = row.get("id") or {}, row.get("name") or {}
            if i.get("rps") and n.get("rps"):
                row["rps_ratio"] = round(n["rps"] / i["rps"], 3)
            if i.get("service_us_per_req") and n.get("service_us_per_req"):
                row["service_cpu_ratio"] = round(n["service_us_per_req"] / i["service_us_per_req"], 2)
            rows.append(row)
    if not rows:
        return None
    return {"pairs": rows, "warm": _json(os.path.join(raw, "names-warm-names.json"))}


# --- (11) replica ----------------------------------------------------------------------------


def replica_results(runs, snaps):
    per_run, totals = [], {}
    for name in sorted(n for n in runs if n.startswith("replica.")):
        _, target, rnd, _ = name.split(".", 3)
        w = window_counts(snaps, name, runs[name])
        if not w:
            continue
        misses = w["lookups"].get("miss", 0)
        row = {"name": name, "target": target, "round": int(rnd), "rps": runs[name]["rps"],
               "errors": runs[name]["errors"], "misses": misses, **w}
        per_run.append(row)
        t = totals.setdefault(target, {"runs": 0, "requests": 0, "misses": 0, "service_cpu_s": 0.0,
                                       "db_reads": {}, "fallbacks": {}, "pg": {}, "rps": []})
        t["runs"] += 1
        t["requests"] += row["requests"] or 0
        t["misses"] += misses
        t["service_cpu_s"] += row["service_cpu_s"] or 0
        t["rps"].append(row["rps"])
        for k, v in row["db_reads"].items():
            t["db_reads"][k] = t["db_reads"].get(k, 0) + v
        for k, v in row["fallbacks"].items():
            t["fallbacks"][k] = t["fallbacks"].get(k, 0) + v
        for server, v in row["pg"].items():
            p = t["pg"].setdefault(server, {"cpu_s": 0.0, "items_calls": 0, "items_exec_ms": 0.0})
            for k in p:
                p[k] += v.get(k) or 0
    if not per_run:
        return None
    for t in totals.values():
        m = t["misses"]
        t["service_us_per_miss"] = _per(t["service_cpu_s"], m, 1e6)
        for p in t["pg"].values():
            p["cpu_us_per_miss"] = _per(p["cpu_s"], m, 1e6)
            p["statements_per_miss"] = _per(p["items_calls"], m, digits=3)
            p["exec_us_per_miss"] = _per(p["items_exec_ms"], m, 1e3)
        cpu = sum(p["cpu_s"] for p in t["pg"].values())
        calls = sum(p["items_calls"] for p in t["pg"].values())
        t["postgres_us_per_miss"] = _per(cpu, m, 1e6)
        prim = t["pg"].get("primary") or {}
        t["primary_cpu_share"] = round(prim.get("cpu_s", 0) / cpu, 3) if cpu else None
        t["primary_statement_share"] = round(prim.get("items_calls", 0) / calls, 3) if calls else None
        t["rps_median"] = statistics.median(t["rps"])
    return {"runs": per_run, "by_target": totals}


# --- (12) refresh ----------------------------------------------------------------------------


# The runs: from a cold cache with and without early refresh, then the same after warming
# the most read ids together ("hot-").
MODES = ("with", "without", "hot-with", "hot-without")
_P_CACHE = {}


def zipf_p(n, s):
    key = (n, s)
    if key not in _P_CACHE:
        p = np.arange(1, n + 1, dtype=np.float64) ** (-s)
        _P_CACHE[key] = p / p.sum()
    return _P_CACHE[key]


def seen_within(p, requests):
    """P(the next request's id was among the last `requests` requests): sum p (1 - (1-p)^R)."""
    return float(np.sum(p * (1 - np.exp(requests * np.log1p(-p)))))


def lifetimes(ttl, jitter, k=5):
    """Fresh lifetimes drawn as the service draws them, ttl × (1 ± jitter): k evenly spaced."""
    return [ttl * (1 - jitter + 2 * jitter * (i + 0.5) / k) for i in range(k)]


def refresh_series(mon, t0, t_end):
    rows = []
    for a, b in zip(mon, mon[1:]):
        if a.get("pid") != b.get("pid") or "metrics" not in a or "metrics" not in b:
            continue
        if b["t"] < t0 or a["t"] > t_end:
            continue
        dt = b["t"] - a["t"]
        lk = _dmap(a, b, "metrics", "lookups")
        q = _dmap(a, b, "metrics", "queries")
        n = sum(lk.values())
        rows.append({
            "t": round(b["t"] - t0, 2),
            "dt": round(dt, 3),
            "lookups": n,
            "hit": lk.get("hit", 0),
            "miss": lk.get("miss", 0),
            "stale": lk.get("stale", 0),
            "bypass": lk.get("bypass", 0),
            "hit_ratio": round(lk.get("hit", 0) / n, 4) if n else None,
            "misses_per_s": round(lk.get("miss", 0) / dt, 1),
            "service_queries": q.get("get_item", 0) + q.get("get_items", 0),
            "coalesced": _d(a, b, "metrics", "coalesced"),
            "pg_statements_per_s": _per(_d(a, b, "pg", "primary", "items_calls"), dt),
            "pg_cores": _per(_d(a, b, "pg", "primary", "cpu_s"), dt, digits=3),
            "service_cores": _per(_d(a, b, "svc_cpu_s"), dt, digits=3),
        })
    return rows


def refresh_results(raw, phases, runs, settings):
    st = settings.get("refresh")
    if not st:
        return None
    out = {"settings": st}
    ttl, jitter, swr_on = st["ttl_s"], st.get("ttl_jitter", 0.1), st["swr_s"]
    n_ids, s = st["ids"], st["zipf_s"]
    for mode in MODES:
        ph = phases.get(f"refresh.{mode}.c{st['conns']}")
        mon = _jsonl(os.path.join(raw, f"refresh-{mode}.jsonl"))
        if not ph or not mon:
            continue
        t0 = ph["start"]
        dur = min(st["seconds"], ph["end"] - ph["start"])
        rows = [r for r in refresh_series(mon, t0, t0 + dur) if 0.5 <= r["t"] <= dur + 0.5]
        if not rows:
            continue
        swr = swr_on if mode.split("-")[-1] == "with" else 0
        # Storms: every second from the first expiry (0.9 TTL, the jitter's earliest) on; the
        # seconds before it are the cold start, which no refresh can help.
        storm = [r for r in rows if r["t"] >= 0.9 * ttl]
        mps = [r["misses_per_s"] for r in storm]
        med = statistics.median(mps) if mps else None
        worst = max(storm, key=lambda r: r["misses_per_s"]) if storm else None
        # Steady state: from twice the longest life an entry can be served (TTL + SWR of the
        # run with refresh) on, for both runs alike.
        steady_from = 2 * (1 + jitter) * ttl + 2 * swr_on
        steady = [r for r in rows if r["t"] >= steady_from] or rows[len(rows) // 2:]
        look = sum(r["lookups"] for r in steady)
        span = sum(r["dt"] for r in steady)
        lam = look / span if span else 0
        hits = sum(r["hit"] for r in steady)
        p = zipf_p(n_ids, s)
        lives = lifetimes(ttl, jitter)
        # The ideal: a request hits when its id was read within the last TTL + SWR seconds,
        # the longest an entry can be served after the read that loaded it. An upper bound
        # for any cache with these lifetimes (a hit needs a load by an earlier read, at most
        # that long ago), reached only by one that always refreshes in time and for free.
        ideal = statistics.fmean(seen_within(p, lam * (T + swr)) for T in lives)
        # What this policy gives in the same model (Poisson arrivals at rate lam * p_i):
        # after a fill, the reads within the fresh TTL hit; the first read after it hits (and
        # refreshes) if it comes within the SWR window, else it misses and refills.
        model = statistics.fmean(
            1 - float(np.sum(p * np.exp(-lam * p * swr) / (1 + lam * p * T))) for T in lives)
        # A cache that never expires (the Zipf cold start's ideal): every id ever read hits.
        before = sum(r["lookups"] for r in rows if r["t"] < steady[0]["t"] - 0.5)
        never = seen_within(p, before + look / 2)
        measured = hits / look if look else None
        misses = sum(r["miss"] for r in storm)
        coalesced = sum(r["coalesced"] or 0 for r in storm)
        queries = sum(r["service_queries"] for r in storm)
        pg_calls = sum((r["pg_statements_per_s"] or 0) * r["dt"] for r in storm)
        out[mode] = {
            "swr_s": swr,
            "series": rows,
            "storm_window_from_s": round(0.9 * ttl, 1),
            "misses_per_s_median": med,
            "misses_per_s_max": worst["misses_per_s"] if worst else None,
            "max_second": worst["t"] if worst else None,
            "max_over_median": round(worst["misses_per_s"] / med, 2) if worst and med else None,
            "steady_from_s": round(steady[0]["t"], 1),
            "steady_rate": round(lam, 1),
            "steady_hit_ratio": round(measured, 4) if measured is not None else None,
            "ideal_hit_ratio": round(ideal, 4),
            "policy_model_hit_ratio": round(model, 4),
            "never_expiring_hit_ratio": round(never, 4),
            "measured_over_ideal": round(measured / ideal, 4) if measured is not None and ideal else None,
            "measured_over_model": round(measured / model, 4) if measured is not None and model else None,
            # From the first expiry on: misses, the service's item queries, and the loads
            # beyond what misses needed (refreshes: XFetch's, and SWR's in the run with it).
            "misses": misses,
            "service_queries": queries,
            "postgres_statements": round(pg_calls),
            "refresh_loads": queries - (misses - coalesced),
            "lookups_per_s": round(statistics.fmean(r["lookups"] / r["dt"] for r in storm), 1) if storm else None,
            "entries": _json(os.path.join(raw, f"refresh-{mode}-entries.json")),
            "wrk": {k: (runs.get(f"refresh.{mode}.c{st['conns']}") or {}).get(k) for k in ("rps", "errors", "latency_ms")},
        }
    return out if any(m in out for m in MODES) else None


# --- the three together ----------------------------------------------------------------------


# --- (13) the miss path and batch targets (issue 15) -----------------------------------------


MISSPATH_RUNS = [("miss.bypass.c16", "BYPASS (`CACHE_ENABLED=false`), uniform ids"),
                 ("cold.fill.c16", "miss + fill (Redis flushed, every request a new id)"),
                 ("hit.c64", "hit, uniform ids, every id cached"),
                 ("batch.c64", "batch of 100 cached ids (`GET /items?ids=`)"),
                 ("hit.c1", "hit, 1 connection")]
MISSPATH_REFS = [("pgbench.S.c16", "ref.pgbench.c16", "`pgbench -S -M prepared -j 2`"),
                 ("redis.get.c64", "ref.redis.c64", "`redis-benchmark -t get -d <entry size> --threads 2`"),
                 ("redis.get.c1", "ref.redis.c1", "`redis-benchmark -t get -d <entry size> --threads 1`")]


def _statements(path, n=6):
    """The first N lines of RAW/<run>.statements.txt (psql -XtA: calls|rows|exec_ms|query)."""
    out = []
    if not os.path.exists(path):
        return out
    for line in open(path):
        parts = line.rstrip("\n").split("|", 3)
        if len(parts) == 4 and parts[0].isdigit():
            out.append({"calls": int(parts[0]), "rows": int(parts[1]), "exec_ms": float(parts[2] or 0),
                        "query": parts[3]})
    return out[:n]


def _redis_commands(path):
    """RAW/<run>.redis-commands.txt (INFO commandstats): {command: calls}."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        if line.startswith("cmdstat_"):
            name, rest = line[8:].strip().split(":", 1)
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            out[name] = int(fields.get("calls", 0))
    return out


def _redis_trace(raw):
    """RAW/cold.fill.redis-trace.txt (redis-cli MONITOR around one miss, then a hit of the
    same id): [{"t", "lua", "cmd", "args"}], and the two requests' X-Cache."""
    path = os.path.join(raw, "cold.fill.redis-trace.txt")
    if not os.path.exists(path):
        return None
    rows = []
    for line in open(path):
        m = re.match(r'^([0-9.]+) \[\d+ ([^\]]+)\] (.*)$', line.strip())
        if not m:
            continue
        args = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(3))
        if not args:
            continue
        rows.append({"t": float(m.group(1)), "lua": m.group(2) == "lua", "cmd": args[0].upper(),
                     "args": [a if len(a) <= 48 else a[:45] + "..." for a in args[1:4]]})
    heads = {}
    for kind in ("miss", "hit"):
        hp = os.path.join(raw, f"cold.fill.trace-{kind}.headers")
        if os.path.exists(hp):
            xc = re.search(r"^x-cache:\s*(\S+)", open(hp).read(), re.I | re.M)
            heads[kind] = xc.group(1) if xc else None
    tid = open(os.path.join(raw, "cold.fill.trace-id")).read().strip() if os.path.exists(
        os.path.join(raw, "cold.fill.trace-id")) else None
    return {"id": tid, "commands": rows, "x_cache": heads}


def misspath_results(raw, phases, runs, refs, meta):
    snaps = _jsonl(os.path.join(raw, "probe.jsonl"))
    nproc = meta["machine"]["nproc"]

    def machine_us(r):
        busy, rps = r.get("machine_busy"), r.get("rps")
        return round(busy * nproc / rps * 1e6, 1) if busy is not None and rps else None

    rows = []
    for name, label in MISSPATH_RUNS:
        r = runs.get(name)
        if not r:
            continue
        w = window_counts(snaps, name, r) or {}
        row = {"name": name, "label": label, "conns": r.get("conns"), "requests": r["requests"], "rps": r["rps"],
               "items_per_s": r["items_per_s"], "latency_ms": r["latency_ms"], "errors": r["errors"],
               "error_kinds": r.get("error_kinds"), "machine_us_per_req": machine_us(r),
               "others_cpu_cores": r.get("others_cpu_cores"),
               "statements": _statements(os.path.join(raw, f"{name}.statements.txt"))}
        for k in ("lookups", "service_us_per_req", "postgres_us_per_req", "redis_us_per_req", "statements_per_req",
                  "all_statements_per_req", "lookups_per_req", "queries", "service_ctxsw_per_req",
                  "postgres_ctxsw_per_req"):
            row[k] = w.get(k)
        cmds = _redis_commands(os.path.join(raw, f"{name}.redis-commands.txt"))
        if cmds and r["requests"]:
            # The commandstats span a little more than wrk's run (reset before the first probe,
            # read after the second), as the probes do.
            row["redis_commands_per_req"] = {k: round(v / r["requests"], 3)
                                             for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])}
            row["redis_calls_per_req"] = round(sum(cmds.values()) / r["requests"], 3)
        rows.append(row)
    ref_rows = []
    for key, label, desc in MISSPATH_REFS:
        r = refs.get(key)
        if not r:
            continue
        ph = phases.get(label) or {}
        n = r.get("requests") or ph.get("requests")
        w = window_counts(snaps, label, {"requests": n}) or {}
        ref_rows.append({"name": key, "label": desc, "conns": r.get("conns"), "rps": r["rps"],
                         "latency_ms": r.get("latency_ms"), "requests": n, "machine_us_per_req": machine_us(r),
                         "postgres_us_per_req": w.get("postgres_us_per_req"),
                         "redis_us_per_req": w.get("redis_us_per_req"),
                         "others_cpu_cores": r.get("others_cpu_cores")})
    if not rows and not ref_rows:
        return None
    return {"runs": rows, "refs": ref_rows, "trace": _redis_trace(raw),
            "profiled": [t for t in ("bypass", "cold") if os.path.exists(os.path.join(raw, f"perf-{t}.data"))],
            "warm": _json(os.path.join(raw, "warm.json"))}


def misspath_targets(mp):
    runs = {r["name"]: r for r in mp["runs"]}
    refs = {r["name"]: r for r in mp["refs"]}
    out = []

    def get(d, k, *path):
        v = d.get(k)
        for p in path:
            v = (v or {}).get(p)
        return v

    def row(target, measured, a, b, op, threshold, info=False):
        ratio = round(a / b, 3) if a is not None and b else None
        ok = None
        if ratio is not None and not info:
            ok = ratio >= threshold if op == ">=" else ratio <= threshold
        out.append({"target": target, "measured": measured, "ratio": ratio,
                    "threshold": f"{op} {threshold}" + (" (a full run's target; here for information)" if info else ""),
                    "pass": ok, "info": info})

    pg = get(refs, "pgbench.S.c16", "rps")
    for name, text, thr in (("miss.bypass.c16", "miss path (BYPASS) req/s at 16 connections ≥ 0.5 × "
                                                "`pgbench -S -M prepared -c 16` tps", 0.5),
                            ("cold.fill.c16", "miss + fill req/s (16 connections, every id new) ≥ 0.4 × "
                                              "`pgbench -S -M prepared -c 16` tps", 0.4)):
        v = get(runs, name, "rps")
        row(text, f"{_fmt(v)} req/s vs {_fmt(pg)} tps", v, pg, ">=", thr)
    b, h = get(runs, "batch.c64", "items_per_s"), get(runs, "hit.c64", "items_per_s")
    row("batch of 100 cached ids: items/s ≥ 10 × the hit path's items/s (both at 64 connections)",
        f"{_fmt(b)} vs {_fmt(h)} items/s", b, h, ">=", 10)
    r64 = get(refs, "redis.get.c64", "rps")
    row("hit path req/s at 64 connections ÷ `redis-benchmark -t get -c 64`",
        f"{_fmt(h)} vs {_fmt(r64)} req/s", h, r64, ">=", 0.7, info=True)
    m1, p1 = get(runs, "hit.c1", "latency_ms", "mean"), get(refs, "redis.get.c1", "latency_ms", "p50")
    if m1 is not None or p1 is not None:
        row("hit path mean latency at 1 connection ÷ `redis-benchmark -c 1` p50",
            f"{_fmt(m1, 3)} vs {_fmt(p1, 3)} ms", m1, p1, "<=", 2.5, info=True)
    return out


def misspath_markdown(mp):
    L = ["## The miss path and batch reads (issue 15)\n",
         "| run | conns | req/s | items/s | mean ms | p99 ms | errors | others' builds/tests (cores) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in mp["runs"]:
        lat = r["latency_ms"]
        errs = _fmt(r["errors"]) + (f" ({', '.join(f'{k} {v}' for k, v in r['error_kinds'].items())})"
                                    if r.get("error_kinds") else "")
        L.append(f"| {r['name']}: {r['label']} | {r['conns']} | {_fmt(r['rps'], 0)} | {_fmt(r['items_per_s'], 0)} | "
                 f"{_fmt(lat.get('mean'), 3)} | {_fmt(lat.get('p99'), 3)} | {errs} | {_fmt(r.get('others_cpu_cores'), 2)} |")
    L.append("")
    L += ["Per request, over each measured run, from snapshots around it (`bench/probe.py`: /proc, the service's "
          "`/metrics`, pg_stat_statements) and Redis's `INFO commandstats` (reset after the warm-up): CPU of the "
          "service, Postgres (its whole process tree), Redis, and the whole machine (everything on the 2 cores: the "
          "load generator and others' builds too); context switches of the service's threads and of Postgres's "
          "processes; statements in the itemcache database (on `items`, and all); Redis commands (those run inside "
          "scripts counted too).\n",
          "| run | service CPU µs | Postgres CPU µs | Redis CPU µs | machine CPU µs | service context switches | "
          "Postgres context switches | statements on items | all statements | Redis commands | cache lookups |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in mp["runs"]:
        L.append(f"| {r['name']} | {_fmt(r.get('service_us_per_req'), 1)} | {_fmt(r.get('postgres_us_per_req'), 1)} | "
                 f"{_fmt(r.get('redis_us_per_req'), 1)} | {_fmt(r.get('machine_us_per_req'), 0)} | "
                 f"{_fmt(r.get('service_ctxsw_per_req'), 2)} | {_fmt(r.get('postgres_ctxsw_per_req'), 2)} | "
                 f"{_fmt(r.get('statements_per_req'), 3)} | {_fmt(r.get('all_statements_per_req'), 3)} | "
                 f"{_fmt(r.get('redis_calls_per_req'), 2)} | {_fmt(r.get('lookups_per_req'), 3)} |")
    L.append("")
    rc = [r for r in mp["runs"] if any(v >= 0.005 for v in (r.get("redis_commands_per_req") or {}).values())]
    if rc:
        L.append("Redis commands per request: " + "; ".join(
            f"{r['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["redis_commands_per_req"].items() if v >= 0.005)
            for r in rc) + ".\n")
    tr = mp.get("trace")
    if tr and tr["commands"]:
        cmds = tr["commands"]
        t0 = cmds[0]["t"]
        # The two requests are 0.2 s apart: the first gap over 0.1 s separates them.
        cut = next((i for i in range(1, len(cmds)) if cmds[i]["t"] - cmds[i - 1]["t"] > 0.1), len(cmds))
        first, second = cmds[:cut], cmds[cut:]
        L.append(f"One miss traced after the measured run (`redis-cli MONITOR` while one request read id {tr['id']}, "
                 f"evicted just before, answered {tr['x_cache'].get('miss')}, then the same id again 0.2 s later, "
                 f"answered {tr['x_cache'].get('hit')}): the first request sent "
                 f"{sum(1 for c in first if not c['lua'])} commands, and scripts ran "
                 f"{sum(1 for c in first if c['lua'])} more (`lua`); the second sent "
                 f"{sum(1 for c in second if not c['lua'])}:\n")
        L.append("| ms | from | command |")
        L.append("| --- | --- | --- |")
        for c in cmds[:40]:
            L.append(f"| {(c['t'] - t0) * 1000:.2f} | {'lua' if c['lua'] else 'service'} | "
                     f"`{' '.join([c['cmd']] + c['args']).replace('|', '/')}` |")
        L.append("")
    b = next((r for r in mp["runs"] if r["name"] == "batch.c64"), None)
    if b and b.get("service_us_per_req"):
        L.append(f"Batch of 100: {b['service_us_per_req'] / 100:.2f} µs of service CPU per item "
                 f"({b['service_us_per_req']:.0f} µs per request).\n")
    if mp["refs"]:
        L.append("References, same run (CPU per request from the same snapshots):\n")
        L.append("| reference | conns | req/s (tps) | mean ms | p50 ms | Postgres CPU µs/req | Redis CPU µs/req | "
                 "machine CPU µs/req | others (cores) |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in mp["refs"]:
            lat = r.get("latency_ms") or {}
            L.append(f"| {r['label']} | {r['conns']} | {_fmt(r['rps'], 0)} | {_fmt(lat.get('mean'), 3)} | "
                     f"{_fmt(lat.get('p50'), 3)} | {_fmt(r.get('postgres_us_per_req'), 1)} | "
                     f"{_fmt(r.get('redis_us_per_req'), 1)} | {_fmt(r.get('machine_us_per_req'), 0)} | "
                     f"{_fmt(r.get('others_cpu_cores'), 2)} |")
        L.append("")
    st = [r for r in mp["runs"] if r.get("statements")]
    if st:
        L.append("Statements in the itemcache database during each measured run (pg_stat_statements, most called "
                 "first, those with at least 0.005 calls per request; the full lists in "
                 "`<run>.statements.txt` of the raw directory):\n")
        L.append("| run | calls / req | rows / call | mean exec ms | statement |")
        L.append("| --- | --- | --- | --- | --- |")
        for r in st:
            shown = [q for i, q in enumerate(r["statements"]) if i == 0 or q["calls"] >= 0.005 * r["requests"]]
            for i, q in enumerate(shown):
                text = q["query"] if len(q["query"]) <= 160 else q["query"][:157] + "..."
                L.append(f"| {r['name'] if i == 0 else ''} | {q['calls'] / r['requests']:.3f} | "
                         f"{q['rows'] / q['calls'] if q['calls'] else 0:.2f} | "
                         f"{q['exec_ms'] / q['calls'] if q['calls'] else 0:.3f} | `{text.replace('|', '/')}` |")
        L.append("")
    if mp.get("profiled"):
        L.append("CPU profiles of " + " and ".join({"bypass": "BYPASS", "cold": "miss + fill"}[t] for t in mp["profiled"])
                 + ": [profile-misspath.md](profile-misspath.md).\n")
    return L


def results(raw, phases, runs, settings):
    snaps = _jsonl(os.path.join(raw, "probe.jsonl"))
    return {"names": names_results(raw, runs, snaps),
            "replica": replica_results(runs, snaps),
            "refresh": refresh_results(raw, phases, runs, settings)}


def targets(res):
    out = []
    rf = res.get("refresh") or {}
    w = rf.get("with")
    if w:
        wo = rf.get("without") or {}
        ratio = w["max_over_median"]
        out.append({
            "target": f"early refresh: no second with more than 2 × the median miss rate (Zipf over "
                      f"{rf['settings']['ids']:,} ids, {rf['settings']['rate']:,} req/s, CACHE_TTL_SECS="
                      f"{rf['settings']['ttl_s']}, CACHE_SWR_SECS={w['swr_s']}, from the first expiry on)",
            "measured": f"max {_fmt(w['misses_per_s_max'], 0)} misses/s (second {w['max_second']:.0f}) vs median "
                        f"{_fmt(w['misses_per_s_median'], 0)}"
                        + (f"; without early refresh: max {_fmt(wo['misses_per_s_max'], 0)} vs median "
                           f"{_fmt(wo['misses_per_s_median'], 0)} = {wo['max_over_median']} ×" if wo else ""),
            "ratio": ratio, "threshold": "<= 2", "pass": ratio is not None and ratio <= 2})
        h, hw = rf.get("hot-with"), rf.get("hot-without") or {}
        if h:
            ratio = h["max_over_median"]
            out.append({
                "target": f"early refresh: no second with more than 2 × the median miss rate, the "
                          f"{rf['settings'].get('hot_warmed', 0):,} most read ids warmed together first",
                "measured": f"max {_fmt(h['misses_per_s_max'], 0)} misses/s (second {h['max_second']:.0f}) vs median "
                            f"{_fmt(h['misses_per_s_median'], 0)}"
                            + (f"; without early refresh: max {_fmt(hw['misses_per_s_max'], 0)} (second "
                               f"{hw['max_second']:.0f}) vs median {_fmt(hw['misses_per_s_median'], 0)} = "
                               f"{hw['max_over_median']} ×" if hw else ""),
                "ratio": ratio, "threshold": "<= 2", "pass": ratio is not None and ratio <= 2})
        # The ideal cache under the same expiry rules (the policy's model: instant loads, every
        # miss coalesced); the upper bound (every id read within TTL + SWR hits, as if every
        # read refreshed for free) is shown beside it.
        model = w["policy_model_hit_ratio"]
        r = round(w["steady_hit_ratio"] / model, 4) if model else None
        out.append({
            "target": "early refresh: steady-state hit ratio within 1 % of an ideal cache under the same expiry "
                      "rules (instant loads, every miss coalesced)",
            "measured": f"{w['steady_hit_ratio']:.4f} vs ideal {model:.4f} (from second "
                        f"{w['steady_from_s']:.0f}, {w['steady_rate']:,.0f} lookups/s); upper bound (every id read "
                        f"within the last TTL + SWR seconds hits): {w['ideal_hit_ratio']:.4f}, "
                        f"{w['measured_over_ideal']} of it",
            "ratio": r, "threshold": ">= 0.99", "pass": r is not None and r >= 0.99})
    return out


# --- markdown --------------------------------------------------------------------------------


def markdown(res, st_all):
    L = []
    if res.get("misspath"):
        L.extend(misspath_markdown(res["misspath"]))
    nm = res.get("names")
    if nm:
        st = st_all.get("names") or {}
        L.append("## Lookups by name beside lookups by id (issue 16)\n")
        L.append(f"Every seeded name belongs to one item, so `GET /items?name=` answers one item, the same one "
                 f"`GET /items/{{id}}` answers. Back to back in one run, same connections: hit (ids and names "
                 f"1..{_fmt(st.get('ids'))} cached, uniform), miss + fill (every request a new id / name, neither "
                 f"the name's list nor its item cached), BYPASS (`CACHE_ENABLED=false`). CPU and statements from "
                 f"/proc and pg_stat_statements around each measured run, per request.\n")
        L.append("| case | by | req/s | mean ms | p99 ms | errors | service CPU µs/req | Postgres CPU µs/req | "
                 "statements on items / req | item lookups / req |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in nm["pairs"]:
            for by in ("id", "name"):
                r = row.get(by)
                if not r:
                    continue
                lat = r["latency_ms"]
                L.append(f"| {row['label'] if by == 'id' else ''} | {by} | {_fmt(r['rps'], 0)} | {_fmt(lat.get('mean'), 3)} | "
                         f"{_fmt(lat.get('p99'), 3)} | {_fmt(r['errors'])} | {_fmt(r.get('service_us_per_req'), 0)} | "
                         f"{_fmt(r.get('postgres_us_per_req'), 0)} | {_fmt(r.get('statements_per_req'), 3)} | "
                         f"{_fmt(r.get('lookups_per_req'), 3)} |")
        L.append("")
        L.append("By name ÷ by id: " + "; ".join(
            f"{row['label']}: {_fmt(row.get('rps_ratio'), 2)} × the req/s, {_fmt(row.get('service_cpu_ratio'), 2)} × "
            f"the service CPU per request" for row in nm["pairs"]) + ".\n")

    rp = res.get("replica")
    if rp:
        st = st_all.get("replica") or {}
        L.append("## Read replicas: the miss path on a standby vs the primary (issue 13)\n")
        L.append(f"A streaming standby (`pg_basebackup -R -X stream`) of the private primary, on the same 2 cores; "
                 f"both tables prewarmed. Every request a new id (miss + fill), {st.get('conns')} connections, "
                 f"{st.get('rounds')} round(s) of standby then primary, each over ids of its own. Postgres CPU is "
                 f"each server's whole process tree (postmaster, backends, WAL sender / receiver, startup; reaped "
                 f"backends included) from /proc; statements on `items` from each server's pg_stat_statements.\n")
        L.append("| misses read from | runs | req/s (median) | misses | reads: primary / replica (service) | fallbacks | "
                 "service CPU µs/miss | primary CPU µs/miss | standby CPU µs/miss | Postgres CPU µs/miss, both | "
                 "primary's share of Postgres CPU | primary's share of statements on items |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for target in ("standby", "primary"):
            t = rp["by_target"].get(target)
            if not t:
                continue
            pg = t["pg"]
            fb = ", ".join(f"{k} {v:,}" for k, v in t["fallbacks"].items()) or "0"
            L.append(f"| {'the standby (DATABASE_REPLICA_URL)' if target == 'standby' else 'the primary (no replica)'} | "
                     f"{t['runs']} | {_fmt(t['rps_median'], 0)} | {_fmt(t['misses'])} | "
                     f"{_fmt(t['db_reads'].get('primary', 0))} / {_fmt(t['db_reads'].get('replica', 0))} | {fb} | "
                     f"{_fmt(t['service_us_per_miss'], 0)} | {_fmt((pg.get('primary') or {}).get('cpu_us_per_miss'), 0)} | "
                     f"{_fmt((pg.get('standby') or {}).get('cpu_us_per_miss'), 0)} | {_fmt(t['postgres_us_per_miss'], 0)} | "
                     f"{_fmt(t['primary_cpu_share'] * 100 if t['primary_cpu_share'] is not None else None, 1)} % | "
                     f"{_fmt(t['primary_statement_share'] * 100 if t['primary_statement_share'] is not None else None, 1)} % |")
        L.append("")
        L.append("Each run:\n")
        L.append("| run | req/s | misses | primary CPU s | standby CPU s | statements primary / standby | "
                 "execution ms primary / standby |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rp["runs"]:
            p, s = r["pg"].get("primary") or {}, r["pg"].get("standby") or {}
            L.append(f"| {r['name']} | {_fmt(r['rps'], 0)} | {_fmt(r['misses'])} | {_fmt(p.get('cpu_s'), 2)} | "
                     f"{_fmt(s.get('cpu_s'), 2)} | {_fmt(p.get('items_calls'))} / {_fmt(s.get('items_calls'))} | "
                     f"{_fmt(p.get('items_exec_ms'), 0)} / {_fmt(s.get('items_exec_ms'), 0)} |")
        L.append("")

    rf = res.get("refresh")
    if rf:
        st = rf["settings"]
        L.append("## Early refresh: misses per second across several TTLs (issue 14)\n")
        L.append(f"Zipf({st['zipf_s']}) over {st['ids']:,} ids at a constant {st['rate']:,} req/s ({st['conns']} "
                 f"connections, wrk paced by `delay()`), {st['seconds']} s from a cold cache, `CACHE_TTL_SECS="
                 f"{st['ttl_s']}` (± {st['ttl_jitter'] * 100:.0f} % jitter), `CACHE_VERIFY_SAMPLE=0`; with early "
                 f"refresh (`CACHE_SWR_SECS={st['swr_s']}`, XFetch on) and without (`CACHE_SWR_SECS=0`; XFetch has "
                 f"no setting, so its refreshes are counted instead). Storm figures from the first expiry "
                 f"(second {0.9 * st['ttl_s']:.0f}) on; steady state from second "
                 f"{2 * 1.1 * st['ttl_s'] + 2 * st['swr_s']:.0f}. The ideal hit ratio: a request hits when its id "
                 f"was read within the last TTL + SWR seconds (an upper bound for any cache whose entries are served "
                 f"at most that long after the read that loaded them), at the measured request rate. The policy's "
                 f"model: the same arrivals through this policy (fresh for the TTL, then the first read within "
                 f"the SWR window refreshes, a later one misses). `hot-`: the same after warming the "
                 f"{st.get('hot_warmed', 0):,} most read ids (Zipf ranks 1..{st.get('hot_warmed', 0):,}) together just "
                 f"before the load, so that their entries expire together one TTL later.\n")
        L.append("| | misses/s median | max (second) | max ÷ median | steady hit ratio | ideal | measured ÷ ideal | "
                 "policy's model | never-expiring cache | misses | item queries (service) | statements on items "
                 "(Postgres) | refresh loads | entries with Δ = 0 ms |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode in MODES:
            r = rf.get(mode)
            if not r:
                continue
            e = r.get("entries") or {}
            label = (f"hot ids warmed, {mode[4:]}" if mode.startswith("hot-") else mode) + " early refresh"
            L.append(f"| {label} (SWR {r['swr_s']} s) | {_fmt(r['misses_per_s_median'], 0)} | "
                     f"{_fmt(r['misses_per_s_max'], 0)} ({r['max_second']:.0f}) | {r['max_over_median']} | "
                     f"{r['steady_hit_ratio']:.4f} | {r['ideal_hit_ratio']:.4f} | {r['measured_over_ideal']:.4f} | "
                     f"{r['policy_model_hit_ratio']:.4f} | {r['never_expiring_hit_ratio']:.4f} | {_fmt(r['misses'])} | "
                     f"{_fmt(r['service_queries'])} | {_fmt(r['postgres_statements'])} | {_fmt(r['refresh_loads'])} | "
                     f"{_fmt(e.get('load_ms_zero_share') * 100 if e.get('load_ms_zero_share') is not None else None, 1)} % "
                     f"of {_fmt(e.get('sampled'))} |")
        L.append("")
    return L


# --- plots -----------------------------------------------------------------------------------


def plots(res, out):
    rf = res.get("refresh") or {}
    plot_pair(rf, "", "refresh.png", "from a cold cache", out)
    plot_pair(rf, "hot-", "refresh_hot.png",
              f"the {(rf.get('settings') or {}).get('hot_warmed', 0):,} most read ids warmed together first", out)


def plot_pair(rf, prefix, png, start, out):
    modes = [(m, c) for m, c in ((prefix + "with", "#2a7ab0"), (prefix + "without", "#c0504d")) if rf.get(m)]
    if not modes:
        return
    st = rf["settings"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    for mode, color in modes:
        r = rf[mode]
        ts = [x["t"] for x in r["series"]]
        label = f"{mode.split('-')[-1]} early refresh (CACHE_SWR_SECS={r['swr_s']})"
        axes[0].plot(ts, [x["misses_per_s"] for x in r["series"]], color=color, lw=1, label=label)
        axes[0].axhline(2 * r["misses_per_s_median"], color=color, lw=0.8, ls=":",
                        label=f"2 × median ({mode.split('-')[-1]}): {2 * r['misses_per_s_median']:,.0f}")
        axes[1].plot(ts, [x["pg_statements_per_s"] for x in r["series"]], color=color, lw=1, label=label)
        axes[2].plot(ts, [x["hit_ratio"] for x in r["series"]], color=color, lw=1, label=f"{label}: measured")
        axes[2].axhline(r["ideal_hit_ratio"], color=color, lw=0.8, ls="--",
                        label=f"ideal for its lifetimes (TTL + {r['swr_s']} s): {r['ideal_hit_ratio']:.3f}")
    for ax in axes:
        for k in range(1, int(st["seconds"] / st["ttl_s"]) + 1):
            ax.axvline(k * st["ttl_s"], color="#999999", lw=0.5, ls=":")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("misses / s")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title(f"Zipf({st['zipf_s']}) over {st['ids']:,} ids at {st['rate']:,} req/s, {start}, "
                      f"CACHE_TTL_SECS={st['ttl_s']} (dotted: multiples of the TTL)", fontsize=10)
    axes[1].set_ylabel("Postgres statements on items / s")
    axes[1].set_ylim(bottom=0)
    axes[2].set_ylabel("hit ratio")
    axes[2].set_ylim(0, 1)
    axes[2].set_xlabel("seconds since the start")
    fig.tight_layout()
    fig.savefig(os.path.join(out, png), dpi=110)
    plt.close(fig)
