#!/usr/bin/env python3
"""Turns one bench/run's raw outputs into results: JSON, a Markdown report, PNG plots.

    analyze.py report RAW OUT [--duration SECS]   -> OUT/latest.{json,md}, OUT/*.png
    analyze.py profile RAW OUT                    -> OUT/profile.md (from perf report text)

RAW holds what bench/run wrote: meta.json, phases.jsonl, *.wrk.txt (a WRKJSON line from
bench/lua/report.lua), ref-redis-c*.csv, ref-pgbench-c*.txt, *.oha.json, stampede-*.json,
warm.json and samples.jsonl (bench/sample.py: one line per second).
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MIB = 1024 * 1024


# --- loading ------------------------------------------------------------------------------


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_wrk(path):
    with open(path) as f:
        text = f.read()
    m = re.search(r"^WRKJSON (.*)$", text, re.M)
    if not m:
        raise SystemExit(f"{path}: no WRKJSON line (did wrk fail?)")
    doc = json.loads(m.group(1))
    secs = doc["duration_us"] / 1e6
    errors = doc["errors"]
    lat = doc["latency_us"]
    return {
        "tool": "wrk",
        "requests": doc["requests"],
        "seconds": round(secs, 2),
        "rps": round(doc["requests"] / secs, 1) if secs else 0.0,
        "errors": sum(errors.values()),
        "error_kinds": {k: v for k, v in errors.items() if v},
        "latency_ms": {
            "mean": round(lat["mean"] / 1000, 3),
            "p50": lat["p"]["50"] / 1000,
            "p90": lat["p"]["90"] / 1000,
            "p99": lat["p"]["99"] / 1000,
            "p99.9": lat["p"]["99.9"] / 1000,
            "max": lat["max"] / 1000,
        },
    }


def load_oha(path):
    with open(path) as f:
        doc = json.load(f)
    s = doc["summary"]
    pct = doc.get("latencyPercentiles", {})
    statuses = doc.get("statusCodeDistribution", {})
    errors = doc.get("errorDistribution", {})
    # Requests still in flight when -z ends are "aborted due to deadline": not errors.
    aborted = errors.pop("aborted due to deadline", 0)
    ok = sum(v for k, v in statuses.items() if str(k).startswith(("2", "3")))
    total = sum(statuses.values()) + sum(errors.values())

    def ms(v):
        return None if v is None else round(v * 1000, 3)

    return {
        "tool": "oha",
        "requests": total,
        "seconds": round(s.get("total", 0), 2),
        "rps": round(s.get("requestsPerSec", 0), 1),
        "errors": total - ok,
        "aborted_at_end": aborted,
        "error_kinds": {**{f"status {k}": v for k, v in statuses.items() if not str(k).startswith(("2", "3"))},
                        **errors},
        "latency_ms": {
            "mean": ms(s.get("average")),
            **{k: ms(v) for k, v in pct.items()},
            "max": ms(s.get("slowest")),
        },
    }


def load_redis_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    head, row = rows[0], rows[1]
    d = dict(zip(head, row))
    return {
        "tool": "redis-benchmark",
        "rps": float(d["rps"]),
        "latency_ms": {
            "mean": float(d["avg_latency_ms"]),
            "p50": float(d["p50_latency_ms"]),
            "p95": float(d["p95_latency_ms"]),
            "p99": float(d["p99_latency_ms"]),
            "max": float(d["max_latency_ms"]),
        },
    }


def load_pgbench(path):
    with open(path) as f:
        text = f.read()
    tps = re.search(r"^tps = ([0-9.]+)", text, re.M)
    lat = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    return {
        "tool": "pgbench",
        "rps": float(tps.group(1)) if tps else 0.0,
        "latency_ms": {"mean": float(lat.group(1)) if lat else None},
        "errors": int(failed.group(1)) if failed else 0,
    }


# --- samples ------------------------------------------------------------------------------


def window(samples, start, end):
    """Samples in [start, end], plus the one just before start (the baseline for deltas)."""
    inside = [s for s in samples if start <= s["t"] <= end + 0.5]
    before = [s for s in samples if s["t"] < start]
    return ([before[-1]] if before else []) + inside


def lookups(s):
    return (s.get("metrics") or {}).get("lookups", {})


def hist_total(s):
    """The item-read latency histogram summed over cache labels: (buckets, sum, count)."""
    h = (s.get("metrics") or {}).get("item_latency", {})
    buckets, total, count = {}, 0.0, 0.0
    for v in h.values():
        for le, n in v["buckets"].items():
            buckets[le] = buckets.get(le, 0.0) + n
        total += v["sum"]
        count += v["count"]
    return buckets, total, count


def hist_quantile(buckets, q):
    """Prometheus-style quantile from cumulative buckets {le: count}; seconds."""
    items = sorted(((float("inf") if le == "+Inf" else float(le)), n) for le, n in buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in items:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def same_process(a, b):
    return a.get("pid") and a.get("pid") == b.get("pid") and "metrics" in a and "metrics" in b


def per_second(samples, t0):
    """One row per consecutive sample pair of one process: hit ratio, lookups/s, latency."""
    rows = []
    for a, b in zip(samples, samples[1:]):
        if not same_process(a, b):
            continue
        dt = b["t"] - a["t"]
        la, lb = lookups(a), lookups(b)
        d = {k: lb.get(k, 0) - la.get(k, 0) for k in set(la) | set(lb)}
        n = sum(d.values())
        ba, sa, ca = hist_total(a)
        bb, sb, cb = hist_total(b)
        dcount = cb - ca
        dbuckets = {le: bb.get(le, 0) - ba.get(le, 0) for le in bb}
        cpu = (b.get("cpu_s", 0) - a.get("cpu_s", 0)) / dt if dt else None
        rows.append({
            "t": round(b["t"] - t0, 2),
            "lookups_per_s": round(n / dt, 1) if dt else 0,
            "lookups": n,
            "hit_ratio": round(d.get("hit", 0) / n, 4) if n else None,
            "mean_ms": round((sb - sa) / dcount * 1000, 3) if dcount > 0 else None,
            "p99_ms": round(hist_quantile(dbuckets, 0.99) * 1000, 3) if dcount > 0 else None,
            "cpu_cores": round(cpu, 2) if cpu is not None else None,
            "rss_mib": round(b.get("rss_kib", 0) / 1024, 1),
            "fds": b.get("fds"),
            "conns": b.get("conns", {}),
        })
    return rows


def phase_stats(samples, ph, others_log=None):
    w = window(samples, ph["start"], ph["end"])
    inside = [s for s in w if ph["start"] <= s["t"] <= ph["end"] + 0.5]
    out = {}
    # The service may have been restarted at the edge of the window: use one process.
    pids = [s.get("pid") for s in inside if s.get("pid")]
    pid = max(set(pids), key=pids.count) if pids else None
    same = [s for s in w if s.get("pid") == pid and "metrics" in s]
    if pid and len(same) >= 2:
        a, b = same[0], same[-1]
        la, lb = lookups(a), lookups(b)
        d = {k: int(lb.get(k, 0) - la.get(k, 0)) for k in set(la) | set(lb)}
        n = sum(d.values())
        out["lookups"] = d
        out["hit_ratio"] = round(d.get("hit", 0) / n, 4) if n else None
        dt = b["t"] - a["t"]
        if dt > 0:
            out["service_cpu_cores"] = round((b.get("cpu_s", 0) - a.get("cpu_s", 0)) / dt, 2)
    if len(w) >= 2:
        a, b = w[0], w[-1]
        if b["machine_total_s"] > a["machine_total_s"]:
            busy = (b["machine_busy_s"] - a["machine_busy_s"]) / (b["machine_total_s"] - a["machine_total_s"])
            out["machine_busy"] = round(busy, 2)
    rss = [s.get("rss_kib", 0) for s in inside if s.get("rss_kib")]
    if rss:
        out["rss_max_mib"] = round(max(rss) / 1024, 1)
    conns = [s["conns"]["service"] for s in inside if "conns" in s]
    if conns:
        out["service_conns_max"] = max(conns)
    # Other engineers' builds and tests during the window.
    oth = [s["others"] for s in inside if "others" in s]
    if oth:
        out["others_procs_max"] = max(o["procs"] for o in oth)
        span = max(ph["end"] - ph["start"], 1.0)
        out["others_cpu_cores"] = round(sum(o["cpu_s"] for o in oth[1:]) / span, 2)
    elif others_log:
        counts = [n for t, n in others_log if ph["start"] - 5 <= t <= ph["end"] + 5]
        if counts:
            out["others_procs_max"] = max(counts)
    return out


def load_others_log(raw):
    """Fallback for runs whose sampler did not record other processes: RAW/others.log,
    lines "unix-time count [load]" from a separate 10-second poll."""
    path = os.path.join(raw, "others.log")
    if not os.path.exists(path):
        return None
    rows = []
    for line in open(path):
        parts = line.split()
        if len(parts) >= 2:
            rows.append((float(parts[0]), int(float(parts[1]))))
    return rows


# --- Zipf: the ideal hit ratio -------------------------------------------------------------


def ideal_hit_ratio(n_ids, s, requests_seen):
    """P(the next request's id was already requested) after R requests, Zipf(s) over n_ids:
    sum_i p_i (1 - (1 - p_i)^R). What a cache that never evicts and fills instantly gets."""
    ranks = np.arange(1, n_ids + 1, dtype=np.float64)
    p = ranks ** (-s)
    p /= p.sum()
    log1m = np.log1p(-p)
    return [float(np.sum(p * (1 - np.exp(r * log1m)))) for r in requests_seen]


# --- report -------------------------------------------------------------------------------


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def report(raw, out, duration):
    meta = json.load(open(os.path.join(raw, "meta.json")))
    phases = {p["name"]: p for p in load_jsonl(os.path.join(raw, "phases.jsonl"))}
    samples = load_jsonl(os.path.join(raw, "samples.jsonl"))
    others_log = load_others_log(raw)
    settings = meta["settings"]
    n_items = settings["items"]

    runs = {}
    for path in sorted(glob.glob(os.path.join(raw, "*.wrk.txt"))):
        name = os.path.basename(path)[: -len(".wrk.txt")]
        if name in ("cold.warmup", "profile"):
            continue
        runs[name] = load_wrk(path)
    for path in sorted(glob.glob(os.path.join(raw, "*.oha.json"))):
        runs[os.path.basename(path)[: -len(".oha.json")]] = load_oha(path)
    refs = {}
    for path in sorted(glob.glob(os.path.join(raw, "ref-redis-c*.csv"))):
        c = int(re.search(r"c(\d+)\.csv$", path).group(1))
        refs[f"redis.get.c{c}"] = {**load_redis_csv(path), "conns": c}
    for path in sorted(glob.glob(os.path.join(raw, "ref-pgbench-c*.txt"))):
        c = int(re.search(r"c(\d+)\.txt$", path).group(1))
        refs[f"pgbench.S.c{c}"] = {**load_pgbench(path), "conns": c}
    for name in [n for n in runs if n.startswith("ref.floor.")]:
        refs["floor.healthz." + name.split(".")[-1]] = {**runs.pop(name), "conns": int(name.split(".c")[-1])}

    for name, r in runs.items():
        ph = phases.get(name)
        if ph:
            r["conns"] = ph.get("conns")
            r.update(phase_stats(samples, ph, others_log))
    for name, r in refs.items():
        ph = phases.get("ref." + name.replace("redis.get", "redis").replace("pgbench.S", "pgbench").replace("floor.healthz", "floor"))
        if ph:
            r.update({k: v for k, v in phase_stats(samples, ph, others_log).items()
                      if k in ("service_cpu_cores", "machine_busy", "rss_max_mib", "others_procs_max", "others_cpu_cores")})
    batch = settings["batch"]
    for name, r in runs.items():
        r["items_per_s"] = round(r["rps"] * (batch if name.startswith("batch.") else 1), 1)

    # Stampede rounds.
    stampede = []
    for path in sorted(glob.glob(os.path.join(raw, "stampede-*.json"))):
        if path.endswith(".statements.txt"):
            continue
        r = int(re.search(r"stampede-(\d+)\.json$", path).group(1))
        doc = json.load(open(path))
        ph = phases.get(f"stampede.{r}", {})
        doc["postgres_queries"] = ph.get("postgres_queries")
        doc["coalesced"] = ph.get("coalesced")
        stampede.append(doc)

    # Zipf series.
    zipf = {}
    ph = phases.get(f"zipf.cold.c{settings['zipf_conns']}")
    if ph:
        rows = per_second(window(samples, ph["start"], ph["end"]), ph["start"])
        # Only whole seconds inside the run (the next step flushes Redis and warms it).
        rows = [r for r in rows if r["t"] <= ph["end"] - ph["start"]]
        cum, seen = 0, []
        for row in rows:
            seen.append(cum + row["lookups"] / 2)
            cum += row["lookups"]
        ideal = ideal_hit_ratio(n_items, settings["zipf_s"], seen) if rows else []
        for row, i in zip(rows, ideal):
            row["ideal_hit_ratio"] = round(i, 4)
        at10 = next((r for r in rows if r["t"] >= 10 - 0.5), None)
        reach = next((r["t"] for r in rows if (r["hit_ratio"] or 0) >= 0.9), None)
        ideal_reach = next((r["t"] for r in rows if r.get("ideal_hit_ratio", 0) >= 0.9), None)
        # Requests an ideal cache needs before its hit ratio reaches 0.9.
        need = None
        if n_items:
            lo, hi = 1, 10**9
            while lo < hi:
                mid = (lo + hi) // 2
                if ideal_hit_ratio(n_items, settings["zipf_s"], [mid])[0] >= 0.9:
                    hi = mid
                else:
                    lo = mid + 1
            need = lo
        zipf = {
            "series": rows,
            "hit_ratio_at_10s": at10["hit_ratio"] if at10 else None,
            "ideal_hit_ratio_at_10s": at10.get("ideal_hit_ratio") if at10 else None,
            "first_second_at_or_above_0.9": reach,
            "ideal_first_second_at_or_above_0.9": ideal_reach,
            "requests_an_ideal_cache_needs_for_0.9": need,
            "requests_in_first_10s": sum(r["lookups"] for r in rows if r["t"] <= 10.5),
        }

    # Soak series.
    soak = {}
    ph = phases.get("soak")
    if ph:
        # oha stops after --soak seconds; the phase ends later (oha's summary): cut there.
        stop = ph["start"] + min(settings["soak_s"], ph["end"] - ph["start"])
        w = [s for s in samples if ph["start"] <= s["t"] <= stop]
        rows = per_second(window(samples, ph["start"], stop), ph["start"])
        rows = [r for r in rows if r["t"] <= stop - ph["start"]]
        rss = [(s["t"] - ph["start"], s["rss_kib"] / 1024) for s in w if s.get("rss_kib")]
        settle = min(10.0, 0.1 * (ph["end"] - ph["start"]))
        steady = [v for t, v in rss if t >= settle] or [v for _, v in rss]
        med = statistics.median(steady) if steady else None
        soak = {
            "seconds": round(stop - ph["start"], 1),
            "rate": ph.get("rate"),
            "conns": ph.get("conns"),
            "rss_mib": {"min": round(min(steady), 1), "median": round(med, 1), "max": round(max(steady), 1),
                        "first": round(steady[0], 1), "last": round(steady[-1], 1)} if steady else None,
            "rss_max_deviation_from_median": round(max(abs(v - med) / med for v in steady), 4) if steady else None,
            "settle_s_excluded": settle,
            "fds": {"min": min(s["fds"] for s in w if "fds" in s), "max": max(s["fds"] for s in w if "fds" in s)} if w else None,
            "service_conns": {"min": min(s["conns"]["service"] for s in w), "max": max(s["conns"]["service"] for s in w)} if w else None,
            "redis_conns_max": max(s["conns"]["redis"] for s in w) if w else None,
            "postgres_conns_max": max(s["conns"]["postgres"] for s in w) if w else None,
            "series": [{"t": round(t, 1), "rss_mib": round(v, 1)} for t, v in rss],
            "per_second": rows,
        }

    # --- targets ---------------------------------------------------------------------------
    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    def get(d, *path):
        for p in path:
            if d is None:
                return None
            d = d.get(p)
        return d

    hit64, hit1 = runs.get("hit.c64"), runs.get("hit.c1")
    pg16 = get(refs, "pgbench.S.c16", "rps")
    targets = []

    def target(name, measured, ratio_v, threshold, op, detail):
        ok = None
        if ratio_v is not None:
            ok = ratio_v >= threshold if op == ">=" else ratio_v <= threshold if op == "<=" else ratio_v == threshold
        targets.append({"target": name, "measured": measured, "ratio": ratio_v, "threshold": f"{op} {threshold}",
                        "pass": ok})

    r = ratio(get(hit64, "rps"), get(refs, "redis.get.c64", "rps"))
    target("hit path rps at 64 connections ≥ 0.7 × redis-benchmark -t get -c 64",
           f"{fmt(get(hit64, 'rps'))} vs {fmt(get(refs, 'redis.get.c64', 'rps'))} rps", r, 0.7, ">=", "")
    r = ratio(get(hit1, "latency_ms", "mean"), get(refs, "redis.get.c1", "latency_ms", "p50"))
    target("hit path mean latency at 1 connection ≤ 2.5 × redis-benchmark -c 1 p50",
           f"{fmt(get(hit1, 'latency_ms', 'mean'), 3)} ms vs {fmt(get(refs, 'redis.get.c1', 'latency_ms', 'p50'), 3)} ms",
           r, 2.5, "<=", "")
    miss = runs.get("miss.bypass.c16")
    r = ratio(get(miss, "rps"), pg16)
    target("miss path (BYPASS) rps at 16 connections ≥ 0.5 × pgbench -S -M prepared -c 16 tps",
           f"{fmt(get(miss, 'rps'))} rps vs {fmt(pg16)} tps", r, 0.5, ">=", "")
    cold = runs.get("cold.fill.c16")
    r = ratio(get(cold, "rps"), pg16)
    target("miss + fill rps (16 connections, every id new) ≥ 0.4 × pgbench -S -c 16 tps",
           f"{fmt(get(cold, 'rps'))} rps vs {fmt(pg16)} tps", r, 0.4, ">=", "")
    b64 = runs.get("batch.c64")
    r = ratio(get(b64, "items_per_s"), get(hit64, "items_per_s"))
    target("batch of 100 cached ids ≥ 10 × hit-path items/s (both at 64 connections)",
           f"{fmt(get(b64, 'items_per_s'))} vs {fmt(get(hit64, 'items_per_s'))} items/s", r, 10, ">=", "")
    if stampede:
        worst_q = max((s["postgres_queries"] or 0) for s in stampede)
        errs = sum(s["errors"] + sum(v for k, v in s["statuses"].items() if k != "200") for s in stampede)
        targets.append({
            "target": f"stampede of {settings['stampede']} on a cold id: 1 Postgres query, 0 errors",
            "measured": f"{', '.join(str(s['postgres_queries']) for s in stampede)} queries in {len(stampede)} rounds; {errs} errors",
            "ratio": worst_q, "threshold": "== 1 and 0 errors", "pass": worst_q == 1 and errs == 0})
    if zipf:
        target("Zipf(0.99) cold start: hit ratio ≥ 0.9 within 10 s",
               f"hit ratio {fmt(zipf['hit_ratio_at_10s'], 3)} in second 10 (an ideal cache, same request count: "
               f"{fmt(zipf['ideal_hit_ratio_at_10s'], 3)}, so measured/ideal = "
               f"{fmt(ratio(zipf['hit_ratio_at_10s'], zipf['ideal_hit_ratio_at_10s']), 3)}); ≥ 0.9 from second "
               f"{fmt(zipf['first_second_at_or_above_0.9'])}; an ideal cache needs "
               f"{fmt(zipf['requests_an_ideal_cache_needs_for_0.9'])} requests for 0.9",
               zipf["hit_ratio_at_10s"], 0.9, ">=", "")
    if soak and soak.get("rss_mib"):
        dev = soak["rss_max_deviation_from_median"]
        targets.append({"target": "memory: RSS flat (±10 %) over the soak",
                        "measured": f"RSS {soak['rss_mib']['min']}–{soak['rss_mib']['max']} MiB over {soak['seconds']:.0f} s "
                                    f"(median {soak['rss_mib']['median']}; first {soak['settle_s_excluded']:.0f} s excluded)",
                        "ratio": dev, "threshold": "<= 0.1", "pass": dev <= 0.1})
    rss256 = max([v for v in (get(runs, "hit.c256", "rss_max_mib"), get(soak, "rss_mib", "max")) if v is not None] or [None]) if runs else None
    if rss256 is not None:
        targets.append({"target": "memory: RSS ≤ 150 MiB at 256 connections",
                        "measured": f"max {rss256} MiB (hit path at 256 connections and the soak)",
                        "ratio": rss256, "threshold": "<= 150", "pass": rss256 <= 150})

    result = {
        "meta": meta,
        "duration_s": duration,
        "targets": targets,
        "references": refs,
        "scenarios": runs,
        "stampede": stampede,
        "zipf": zipf,
        "soak": {k: v for k, v in soak.items()},
        "warm": json.load(open(os.path.join(raw, "warm.json"))) if os.path.exists(os.path.join(raw, "warm.json")) else None,
        "raw_dir": os.path.relpath(raw, out),
        "others_source": "sampler" if any("others" in x for x in samples[:5]) else ("poll" if others_log else None),
    }
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1)
    plots(result, out)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(markdown(result))
    print(os.path.join(out, "latest.md"))
    for t in targets:
        print(f"  {'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else '  ? '}  {t['target']}: {t['measured']} -> {t['ratio']}")


# --- plots --------------------------------------------------------------------------------


def bar_panel(ax, items, field, label_fmt, ylabel, title):
    """One bar per (label, result, colour) that has a result, its `field` in thousands on top."""
    items = [(l, r, c) for l, r, c in items if r]
    bars = ax.bar(range(len(items)), [r[field] for _, r, _ in items], color=[c for _, _, c in items])
    ax.bar_label(bars, labels=[label_fmt.format(r[field] / 1000) for _, r, _ in items], fontsize=7)
    ax.set_xticks(range(len(items)), [l for l, _, _ in items], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plots(res, out):
    refs, runs = res["references"], res["scenarios"]
    conns = [1, 16, 64, 256]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    ax = axes[0]
    series = [("redis-benchmark GET", "redis.get.c{}", refs, "#999999"),
              ("floor: GET /healthz", "floor.healthz.c{}", refs, "#c7b97e"),
              ("hit path GET /items/{id}", "hit.c{}", runs, "#2a7ab0")]
    x = np.arange(len(conns))
    for i, (label, key, src, color) in enumerate(series):
        vals = [(src.get(key.format(c)) or {}).get("rps", 0) for c in conns]
        bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v / 1000:.0f}k" if v else "" for v in vals], fontsize=7)
    ax.set_xticks(x, [f"{c} conn" for c in conns])
    ax.set_ylabel("requests/s")
    ax.set_title("Hit path beside Redis and the framework's floor")
    ax.legend(fontsize=8)

    bar_panel(axes[1], [("pgbench -S\n-c 16", refs.get("pgbench.S.c16"), "#999999"),
                        ("BYPASS\n-c 16", runs.get("miss.bypass.c16"), "#c0504d"),
                        ("BYPASS\n-c 64", runs.get("miss.bypass.c64"), "#c0504d"),
                        ("miss+fill\n-c 16", runs.get("cold.fill.c16"), "#e39c37"),
                        ("95/5 mix\n-c 64", runs.get("mix.c64"), "#6a9f58"),
                        ("Zipf cold\n-c 64", runs.get("zipf.cold.c64"), "#8064a2")],
              "rps", "{:.1f}k", "requests/s", "Postgres-bound paths beside pgbench")
    bar_panel(axes[2], [("single GET\n-c 64", runs.get("hit.c64"), "#2a7ab0"),
                        ("batch 100\n-c 64", runs.get("batch.c64"), "#1b4f72"),
                        ("batch 100\n-c 16", runs.get("batch.c16"), "#1b4f72")],
              "items_per_s", "{:.0f}k", "items/s", "Cached items/s")
    fig.suptitle(f"itemcache throughput ({res['meta']['machine']['nproc']} cores, load generator on the same cores)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=110)
    plt.close(fig)

    # Latency percentiles at a constant rate, hit vs miss (oha, latency-corrected).
    fig, ax = plt.subplots(figsize=(8, 4.6))
    keys = ["p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99"]
    for name, label, color in (("lat.hit", "hit (cache on, all cached)", "#2a7ab0"),
                               ("lat.miss", "miss (CACHE_ENABLED=false, BYPASS)", "#c0504d")):
        r = runs.get(name)
        if not r:
            continue
        ks = [k for k in keys if r["latency_ms"].get(k) is not None]
        ax.plot(ks, [r["latency_ms"][k] for k in ks], marker="o", label=f"{label}: {r['rps']:.0f} req/s", color=color)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    r = runs.get("lat.hit") or runs.get("lat.miss")
    ax.set_title(f"Latency at a constant rate, {r.get('conns') if r else '?'} connections (oha -q, latency-corrected)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency.png"), dpi=110)
    plt.close(fig)

    # Zipf hit ratio over time.
    z = res.get("zipf") or {}
    rows = z.get("series") or []
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4.6))
        ts = [r["t"] for r in rows]
        ax.plot(ts, [r["hit_ratio"] for r in rows], marker=".", label="measured hit ratio (per second)", color="#2a7ab0")
        ax.plot(ts, [r.get("ideal_hit_ratio") for r in rows], ls="--", label="ideal cache, same request count", color="#999999")
        ax.axhline(0.9, color="#c0504d", lw=0.8, ls=":")
        ax.axvline(10, color="#c0504d", lw=0.8, ls=":")
        ax.set_ylim(0, 1)
        ax.set_xlabel("seconds since the cold start")
        ax.set_ylabel("hit ratio")
        ax2 = ax.twinx()
        ax2.plot(ts, [r["mean_ms"] for r in rows], color="#e39c37", lw=1, label="mean latency (service side)")
        ax2.plot(ts, [r["p99_ms"] for r in rows], color="#e39c37", lw=1, ls="--", label="p99 (service side, from buckets)")
        ax2.set_ylabel("ms")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
        ax.set_title("Zipf(0.99) over all ids from a cold cache, 64 connections")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "hit_ratio.png"), dpi=110)
        plt.close(fig)

    s = res.get("soak") or {}
    if s.get("series"):
        fig, (ax, ax3) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        ts = [r["t"] for r in s["series"]]
        ax.plot(ts, [r["rss_mib"] for r in s["series"]], color="#2a7ab0", label="RSS, MiB")
        med = s["rss_mib"]["median"]
        ax.axhspan(med * 0.9, med * 1.1, color="#2a7ab0", alpha=0.1, label="median ± 10 %")
        ax.set_ylim(0, max(160, s["rss_mib"]["max"] * 1.2))
        ax.axhline(150, color="#c0504d", lw=0.8, ls=":", label="150 MiB")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ps = s.get("per_second") or []
        ax3.plot([r["t"] for r in ps], [r["hit_ratio"] for r in ps], color="#2a7ab0", lw=1, label="hit ratio")
        ax3.set_ylim(0, 1.05)
        ax3.set_ylabel("hit ratio")
        ax3.set_xlabel("seconds")
        ax4 = ax3.twinx()
        ax4.plot([r["t"] for r in ps], [r["p99_ms"] for r in ps], color="#c0504d", lw=0.8, label="p99 ms (service side)")
        ax4.set_yscale("log")
        ax4.set_ylabel("ms")
        h3, l3 = ax3.get_legend_handles_labels()
        h4, l4 = ax4.get_legend_handles_labels()
        ax3.legend(h3 + h4, l3 + l4, fontsize=8, loc="lower right")
        ax2.plot([r["t"] for r in ps], [r["fds"] for r in ps], color="#6a9f58", lw=1, label="open fds")
        ax2.plot([r["t"] for r in ps], [r["conns"].get("service") for r in ps], color="#e39c37", lw=1, ls="--",
                 label="client connections")
        ax2.set_ylabel("count")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
        ax.set_title(f"Soak: {s['seconds']:.0f} s at {s['rate'] or 'full speed, wrk'} req/s, {s['conns']} connections")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "soak.png"), dpi=110)
        plt.close(fig)


# --- markdown -----------------------------------------------------------------------------


def us_per_req(r):
    c = r.get("service_cpu_cores")
    return c / r["rps"] * 1e6 if c and r.get("rps") else None


def others(r):
    """Other engineers' build/test processes during a window: "3 (0.8 cores)", or "–"."""
    n = r.get("others_procs_max")
    if n is None:
        return "–"
    if r.get("others_cpu_cores") is not None:
        return f"{n} ({r['others_cpu_cores']:.2f} cores)"
    return f"{n} procs"


def markdown(res):
    m = res["meta"]
    st = m["settings"]
    refs, runs = res["references"], res["scenarios"]
    L = []
    L.append(f"# itemcache benchmark — {m['mode']} run, {m['started_utc']}\n")
    if m["mode"] == "smoke":
        L.append("> **Smoke run**: every scenario for about a second against "
                 f"{st['items']:,} items. It checks the harness; the numbers mean nothing.\n")
    mach = m["machine"]
    v = m["versions"]
    L.append(f"Machine: {mach['nproc']} cores ({mach['cpu_model']}), {mach['mem_gib']} GiB, Linux {mach['kernel']}. "
             f"Service, Postgres, Redis and the load generators all share these cores, on loopback.\n")
    src = m.get("source")
    if src:
        L.append(f"Source: commit `{src['commit']}`"
                 + (f" with {src['uncommitted_files_in_src']} uncommitted file(s) in src/, Cargo.*, migrations/"
                    if src["uncommitted_files_in_src"] else ", clean") + " (the binary was built from the working tree)"
                 + (f"; {src['note']}" if src.get("note") else "") + ".\n")
    L.append("Versions: " + "; ".join(f"{k} `{val}`" for k, val in v.items()) + ".\n")
    q = m["quiet"]
    busy = q["busy_processes_at_start"] or "none"
    L.append(f"Machine before the run: {q['machine_busy_fraction_before'] * 100:.0f} % CPU busy over 3 s; build/test "
             f"processes at start: {busy}; waited {q['waited_s']} s for quiet.\n")
    busy_runs = [n for n, r in runs.items() if (r.get("others_procs_max") or 0) > 0]
    if busy_runs:
        L.append(f"> **Not a quiet run**: other engineers' builds or tests (cargo, rustc, test binaries) were running "
                 f"during {len(busy_runs)} of {len(runs)} measured scenarios (column \"others' builds/tests\"; "
                 + ("from the 1-second sampler" if res.get("others_source") == "sampler" else
                    "from a separate 10-second poll, max within ±5 s of the window") + "), "
                 "competing for the same 2 cores. Ratios against references measured while the machine was quiet "
                 "are pessimistic for those rows.\n")
    L.append(f"Run: {st['items']:,} items, {st['measure_s']} s per measurement after {st['warmup_s']} s warm-up, "
             f"soak {st['soak_s']} s; whole run {res['duration_s']} s ({res['duration_s'] / 60:.1f} min). "
             f"wrk threads: {st['wrk_threads']}; redis-benchmark threads: {st['redis_benchmark_threads']}; "
             f"pgbench -j {st['pgbench_threads']}. Service: {st['service_env']}.\n")

    L.append("## Targets (ratios within this run)\n")
    L.append("| target | measured | ratio | needed | result |")
    L.append("| --- | --- | --- | --- | --- |")
    for t in res["targets"]:
        verdict = "**pass**" if t["pass"] else "**FAIL**" if t["pass"] is False else "n/a"
        L.append(f"| {t['target']} | {t['measured']} | {fmt(t['ratio'], 3)} | {t['threshold']} | {verdict} |")
    L.append("")

    L.append("## References (same run, same machine)\n")
    L.append("| reference | connections | rps / tps | mean ms | p50 ms | p99 ms | service CPU µs/req |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(refs, key=lambda n: (n.split(".c")[0], int(n.split(".c")[-1]))):
        r = refs[name]
        lat = r.get("latency_ms", {})
        label = {"redis": f"`redis-benchmark -t get -d <entry size> --threads {1 if r['conns'] == 1 else 2}`",
                 "pgbench": "`pgbench -S -M prepared -j 2` (scale "
                            f"{st['pgbench_scale']})",
                 "floor": "framework floor: `GET /healthz` (static JSON) with wrk"}[name.split(".")[0]]
        floor = name.startswith("floor")
        L.append(f"| {label} | {r['conns']} | {fmt(r['rps'])} | {fmt(lat.get('mean'), 3)} | {fmt(lat.get('p50'), 3)} | "
                 f"{fmt(lat.get('p99'), 3)} | {fmt(us_per_req(r), 0) if floor else '–'} |")
    L.append("")

    L.append("## Scenarios\n")
    L.append("Latency columns: wrk's (closed loop, not corrected for coordinated omission) except `lat.*` "
             "and `soak` (oha at a constant rate with `--latency-correction`). Hit ratio, service CPU "
             "(cores) and RSS come from the 1-second sampler over the measured window.\n")
    L.append("| scenario | conns | req/s | items/s | mean ms | p50 ms | p99 ms | errors | hit ratio | service CPU (cores) | service CPU µs/req | machine busy | others' builds/tests | RSS max MiB |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    order = ["hit.c1", "hit.c16", "hit.c64", "hit.c256", "miss.bypass.c16", "miss.bypass.c64", "cold.fill.c16",
             "zipf.cold.c64", "batch.c16", "batch.c64", "mix.c64", "lat.hit", "lat.miss", "soak"]
    for name in order + sorted(set(runs) - set(order)):
        r = runs.get(name)
        if not r:
            continue
        lat = r["latency_ms"]
        errs = fmt(r["errors"]) + (f" ({', '.join(f'{k} {v}' for k, v in r['error_kinds'].items())})" if r.get("error_kinds") else "")
        busy = r.get("machine_busy")
        L.append(f"| {name} | {r.get('conns', '')} | {fmt(r['rps'])} | {fmt(r['items_per_s'])} | {fmt(lat.get('mean'), 3)} | "
                 f"{fmt(lat.get('p50'), 3)} | {fmt(lat.get('p99'), 3)} | {errs} | {fmt(r.get('hit_ratio'), 3)} | "
                 f"{fmt(r.get('service_cpu_cores'))} | {fmt(us_per_req(r), 0)} | {fmt(busy * 100 if busy is not None else None, 0)} % | {others(r)} | {fmt(r.get('rss_max_mib'), 1)} |")
    L.append("")

    if res["stampede"]:
        L.append(f"## Stampede: {st['stampede']} concurrent reads of one cold id\n")
        L.append("All connections are opened first, then every request is written back to back "
                 "(`bench/stampede.py`); Postgres statements on `items` counted with pg_stat_statements "
                 "(reset before each round).\n")
        L.append("| round | id | Postgres queries | coalesced (metric) | statuses | X-Cache | errors | sent within ms | p50 ms | max ms |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for i, s in enumerate(res["stampede"], 1):
            L.append(f"| {i} | {s['id']} | {s['postgres_queries']} | {fmt(s.get('coalesced'))} | {s['statuses']} | {s['x_cache']} | "
                     f"{s['errors']} | {s['send_spread_ms']} | {s['latency_ms']['p50']} | {s['latency_ms']['max']} |")
        L.append("")

    z = res.get("zipf") or {}
    if z:
        L.append("## Zipf(0.99) cold start\n")
        L.append(f"Hit ratio in second 10: {fmt(z['hit_ratio_at_10s'], 3)}; an ideal cache (never evicts, fills "
                 f"instantly) given the same {fmt(z['requests_in_first_10s'])} requests in 10 s: "
                 f"{fmt(z['ideal_hit_ratio_at_10s'], 3)}. An ideal cache reaches 0.9 only after "
                 f"{fmt(z['requests_an_ideal_cache_needs_for_0.9'])} requests: the hit ratio is bounded by how many "
                 f"requests have been seen, whatever the service does"
                 + (", so at the request rate this machine sustained, 0.9 within 10 s was out of reach for any cache"
                    if (z['requests_in_first_10s'] or 0) < (z['requests_an_ideal_cache_needs_for_0.9'] or 0) else "")
                 + f". Measured ≥ 0.9 from second {fmt(z['first_second_at_or_above_0.9'])} "
                 f"(ideal: {fmt(z['ideal_first_second_at_or_above_0.9'])}).\n")
        L.append("| second | lookups/s | hit ratio | ideal | mean ms | p99 ms | service CPU |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in z["series"]:
            L.append(f"| {r['t']:.0f} | {fmt(r['lookups_per_s'])} | {fmt(r['hit_ratio'], 3)} | {fmt(r.get('ideal_hit_ratio'), 3)} | "
                     f"{fmt(r['mean_ms'], 3)} | {fmt(r['p99_ms'], 3)} | {fmt(r['cpu_cores'])} |")
        L.append("")

    s = res.get("soak") or {}
    if s.get("rss_mib"):
        L.append("## Soak\n")
        ps = s.get("per_second") or []
        hr = [r["hit_ratio"] for r in ps if r["hit_ratio"] is not None]
        L.append(f"{s['seconds']:.0f} s (`--soak {st['soak_s']}`) at "
                 + (f"{s['rate']} req/s over {s['conns']} connections (oha, " if s.get("rate") else
                    f"full speed over {s['conns']} connections (wrk: oha not installed; "
                 ) + f"uniform ids). RSS {s['rss_mib']['first']} MiB after {s['settle_s_excluded']:.0f} s → {s['rss_mib']['last']} MiB "
                 f"at the end (min {s['rss_mib']['min']}, max {s['rss_mib']['max']}); open fds {s['fds']['min']}–{s['fds']['max']}; "
                 f"client connections {s['service_conns']['min']}–{s['service_conns']['max']}; Redis connections (all "
                 f"clients) ≤ {s['redis_conns_max']}; Postgres connections (all clients) ≤ {s['postgres_conns_max']}. "
                 + (f"Hit ratio over the soak {min(hr):.3f}–{max(hr):.3f} (entries expire after CACHE_TTL_SECS=300 ± 10 %)." if hr else "")
                 + "\n")
        sr = runs.get("soak") or {}
        if sr:
            lk = sr.get("lookups") or {}
            lat = sr["latency_ms"]
            L.append(f"Lookups over the soak: " + ", ".join(f"{k} {v:,}" for k, v in sorted(lk.items())) +
                     f". Errors: {sr['errors']:,}" + (f" ({', '.join(f'{k} {v}' for k, v in sr['error_kinds'].items())})" if sr.get("error_kinds") else "") +
                     f". Latency (oha, corrected): p50 {fmt(lat.get('p50'), 2)} ms, p99 {fmt(lat.get('p99'), 1)} ms, max {fmt(lat.get('max'), 1)} ms.\n")

    L.append("## Plots\n")
    for png, alt in (("throughput.png", "throughput"), ("latency.png", "latency hit vs miss"),
                     ("hit_ratio.png", "Zipf hit ratio over time"), ("soak.png", "RSS over the soak")):
        L.append(f"![{alt}]({png})")
    L.append("")
    if res.get("warm"):
        w = res["warm"]
        L.append(f"Cache warmed before the hit path through the batch endpoint: {w['requests']:,} requests, "
                 f"{w['found']:,} items in {w['seconds']} s.\n")
    return "\n".join(L)


# --- profile ------------------------------------------------------------------------------

CATEGORIES = [
    ("our code (itemcache)", re.compile(r"^itemcache::")),
    ("actix (web, http, server, service)", re.compile(r"^(actix|actix_web|actix_http|actix_server|actix_service|actix_router|actix_rt|actix_codec|actix_utils|local_channel|h2|httparse|http)::")),
    ("redis client (redis, combine, deadpool)", re.compile(r"^(redis|combine|deadpool|deadpool_redis|deadpool_runtime)::")),
    ("tokio runtime", re.compile(r"^(tokio|mio|tokio_util)::")),
    ("metrics (metrics, exporter, quanta)", re.compile(r"^(metrics|metrics_exporter_prometheus|metrics_util|quanta|sketches_ddsketch)::")),
    ("tracing", re.compile(r"^(tracing|tracing_core|tracing_subscriber)::")),
    ("serde / json", re.compile(r"^(serde|serde_json|itoa|ryu)::")),
    ("futures", re.compile(r"^(futures|futures_util|futures_core|futures_channel)::")),
    ("Rust std / alloc / core / hashbrown", re.compile(r"^(std|core|alloc|hashbrown|bytes|smallvec|parking_lot|parking_lot_core|crossbeam\w*|rand\w*|uuid|chrono|memchr|foldhash)::")),
]


def crate_of(symbol):
    s = symbol.strip()
    # Strip wrappers: "<X as Y>::f" -> X; "core::ptr::drop_in_place<X>" -> X; "<[X]>" -> X.
    for _ in range(4):
        m = re.match(r"^(?:core::ptr::drop_in_place<|<|\[)(.*)$", s)
        if not m:
            break
        s = m.group(1).lstrip("&*").replace("mut ", "").replace("dyn ", "")
    # "<T as core::ops::Fn>" or "<u64 as itoa::..>": a primitive or generic: the trait's crate.
    m = re.match(r"^\w+ as (.*)$", s)
    if m and "::" in m.group(1):
        s = m.group(1)
    return s


def classify(dso, symbol):
    if symbol.startswith("[k]"):
        return "kernel"
    sym = symbol[4:] if symbol.startswith("[.]") else symbol
    if dso.startswith("[vdso]"):
        return "kernel"
    if dso.startswith("libc") or dso.startswith("ld-linux"):
        return "libc (malloc, memcpy, syscalls' user side)"
    if dso.startswith("libm") or dso.startswith("libgcc"):
        return "Rust std / alloc / core / hashbrown"
    if sym.startswith("__rustc") or sym.startswith("__floattidf") or sym.startswith("rust_"):
        return "Rust std / alloc / core / hashbrown"
    if dso.startswith("[unknown]") or sym.startswith("0x"):
        return "unknown"
    inner = crate_of(sym)
    for name, rx in CATEGORIES:
        if rx.match(inner):
            return name
    return "other: " + (inner.split("::")[0] if "::" in inner else inner[:40])


def profile(raw, out):
    self_path = os.path.join(raw, "perf-self.txt")
    rows = []
    with open(self_path) as f:
        for line in f:
            m = re.match(r"^\s+([0-9.]+)%\s+(\S+)\s+(\[[.k]\]\s.*)$", line)
            if m:
                # perf pads the symbol column and may end the line with "-" columns.
                rows.append((float(m.group(1)), m.group(2), re.sub(r"[\s-]+$", "", m.group(3))))
    cats = {}
    for pct, dso, sym in rows:
        cats[classify(dso, sym)] = cats.get(classify(dso, sym), 0) + pct
    merged = {}
    for k, v in cats.items():
        key = "other crates" if k.startswith("other: ") else k
        merged[key] = merged.get(key, 0) + v
    others = sorted(((k[7:], v) for k, v in cats.items() if k.startswith("other: ")), key=lambda kv: -kv[1])

    children = []
    cpath = os.path.join(raw, "perf-children.txt")
    if os.path.exists(cpath):
        with open(cpath) as f:
            for line in f:
                m = re.match(r"^\s+([0-9.]+)%\s+([0-9.]+)%\s+\[[.k]\]\s+(.*)$", line)
                if not m:
                    continue
                sym = re.sub(r"[\s-]+$", "", m.group(3))
                # Our own functions, also inlined ones ("poll<itemcache::...> (inlined)").
                if crate_of(sym).startswith("itemcache::") or re.match(r"^[\w{}#]+<itemcache::", sym):
                    children.append((float(m.group(1)), float(m.group(2)), sym))
    wrk = None
    wpath = os.path.join(raw, "profile.wrk.txt")
    if os.path.exists(wpath):
        mm = re.search(r"Requests/sec:\s+([0-9.]+)", open(wpath).read())
        wrk = float(mm.group(1)) if mm else None
    samples = None
    log = os.path.join(raw, "perf-record.log")
    if os.path.exists(log):
        mm = re.search(r"\((\d+) samples\)", open(log).read())
        samples = int(mm.group(1)) if mm else None

    L = ["# Hit-path profile\n",
         f"`perf record -e cpu-clock -F 499 --call-graph dwarf` on the service for 10 s while wrk drove the hit path "
         f"(uniform ids, all cached, 64 connections, 2 threads{f', {wrk:,.0f} req/s under perf' if wrk else ''}"
         f"{f'; {samples:,} samples' if samples else ''}). "
         "This machine has no hardware counters (`perf stat -e instructions` is not supported), so samples are "
         "timer-based (cpu-clock). Percentages are of the service's own CPU time. Raw data: "
         f"`{os.path.relpath(raw, out)}` (perf-self.txt, perf-children.txt"
         f"{', perf.folded' if os.path.exists(os.path.join(raw, 'perf.folded')) else ''}).\n",
         "## Where the service's CPU goes (self time)\n",
         "| category | self % |", "| --- | --- |"]
    for k, v in sorted(merged.items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {v:.1f} |")
    L.append("")
    if others:
        L.append("Other crates: " + ", ".join(f"{k} {v:.1f} %" for k, v in others[:12]) + ".\n")
    comm_path = os.path.join(raw, "perf-comm.txt")
    if os.path.exists(comm_path):
        threads = [(float(m.group(1)), m.group(2).strip()) for m in
                   (re.match(r"^\s+([0-9.]+)%\s+(.*)$", line) for line in open(comm_path)) if m]
        if threads:
            L.append("## By thread\n")
            L.append("| thread | % of the service's CPU |")
            L.append("| --- | --- |")
            for pct, name in threads:
                L.append(f"| {name} | {pct:.1f} |")
            L.append("")
    stat_path = os.path.join(raw, "perf-stat.txt")
    if os.path.exists(stat_path):
        text = open(stat_path).read()
        cs = re.search(r"([0-9,]+)\s+context-switches", text)
        mig = re.search(r"([0-9,]+)\s+cpu-migrations", text)
        clk = re.search(r"([0-9,.]+)\s+msec task-clock", text)
        el = re.search(r"([0-9.]+) seconds time elapsed", text)
        wrk_stat = None
        wsp = os.path.join(raw, "profile.wrk.txt")
        if os.path.exists(wsp):
            mm = re.search(r"Requests/sec:\s+([0-9.]+)", open(wsp).read())
            wrk_stat = float(mm.group(1)) if mm else None
        if cs and el:
            n_cs = int(cs.group(1).replace(",", ""))
            secs = float(el.group(1))
            line = (f"`perf stat -e context-switches,cpu-migrations,task-clock` on the service for {secs:.0f} s of the "
                    f"same load: {n_cs / secs:,.0f} context switches/s")
            if wrk_stat:
                line += f" (≈ {n_cs / secs / wrk_stat:.2f} per request at {wrk_stat:,.0f} req/s)"
            if mig:
                line += f", {int(mig.group(1).replace(',', '')) / secs:,.0f} CPU migrations/s"
            if clk:
                line += f", {float(clk.group(1).replace(',', '')) / 1000 / secs:.2f} CPUs used"
            L.append(line + ".\n")
    L.append("## Top symbols (self time)\n")
    L.append("| self % | object | symbol | category |")
    L.append("| --- | --- | --- | --- |")
    for pct, dso, sym in sorted(rows, key=lambda r: -r[0])[:30]:
        short = sym if len(sym) < 140 else sym[:137] + "..."
        L.append(f"| {pct:.2f} | {dso} | `{short}` | {classify(dso, sym)} |")
    L.append("")
    if children:
        L.append("## Our functions (inclusive: the function and what it calls)\n")
        L.append("| children % | self % | function |")
        L.append("| --- | --- | --- |")
        for c, s, sym in children[:30]:
            short = sym if len(sym) < 140 else sym[:137] + "..."
            L.append(f"| {c:.1f} | {s:.2f} | `{short}` |")
        L.append("")
    if os.path.exists(os.path.join(out, "profile-hit-path.svg")):
        L.append("Flame graph: [profile-hit-path.svg](profile-hit-path.svg).\n")
    L.append("## Findings\n")
    # The findings are written by hand; keep them when the tables are regenerated.
    old = os.path.join(out, "profile.md")
    kept = None
    if os.path.exists(old):
        text = open(old).read()
        if "## Findings" in text:
            kept = text.split("## Findings", 1)[1].strip()
    if kept and "_(written by hand" not in kept:
        L.append(kept + "\n")
    else:
        L.append("_(written by hand after reading the tables above)_\n")
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write("\n".join(L))
    print(os.path.join(out, "profile.md"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["report", "profile"])
    ap.add_argument("raw")
    ap.add_argument("out")
    ap.add_argument("--duration", type=int, default=0)
    args = ap.parse_args()
    raw, out = os.path.abspath(args.raw), os.path.abspath(args.out)
    if args.command == "report":
        report(raw, out, args.duration)
    else:
        profile(raw, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
