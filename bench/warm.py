#!/usr/bin/env python3
"""Warms the cache with every id in 1..N through the service's own batch read
(GET /items?ids=a,...,a+99), a few requests in parallel; fails on any non-200.
Prints one JSON object (requests, seconds, items found, ids missing).
With --by-name, looks up the seeded name of every id in 1..N instead (GET /items?name=,
one request each; the name's list and its item cached), and counts as missing every
lookup that does not answer exactly that id (bench/lua/names.lua computes the same names).

With --zipf-ranks K, warms the ids of Zipf ranks 1..K instead of ids 1..N, as
bench/lua/zipf.lua maps ranks to ids over --count ids (the K most read ids, all at once).

    warm.py --port P --count N [--parallel 8] [--by-name | --zipf-ranks K]
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

# The seed's names (src/seed.rs): item n is "<adjective> <material> <noun> <n, 7 digits>".
ADJ = ["Compact", "Deluxe", "Rugged", "Classic", "Smart", "Portable", "Ergonomic", "Vintage", "Quiet",
       "Heavy-duty", "Slim", "Modular", "Wireless", "Foldable", "Premium", "Eco"]
MAT = ["Steel", "Oak", "Bamboo", "Copper", "Ceramic", "Carbon", "Linen", "Glass", "Walnut", "Titanium"]
NOUN = ["Widget", "Kettle", "Lamp", "Backpack", "Chair", "Speaker", "Notebook", "Bottle", "Clock", "Drill",
        "Mug", "Router", "Blender", "Desk", "Helmet", "Tent", "Camera", "Keyboard", "Scarf", "Skillet"]


def seeded_name(n):
    return f"{ADJ[(n * 7) % 16]} {MAT[(n * 13) % 10]} {NOUN[(n * 31) % 20]} {n:07d}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--by-name", action="store_true")
    ap.add_argument("--zipf-ranks", type=int, default=0)
    args = ap.parse_args()
    if args.by_name:
        args.batch = 1
    if args.zipf_ranks:
        # zipf.lua: id = (rank - 1) * P mod N + 1, P = 999983.
        ids = [(r - 1) * 999983 % args.count + 1 for r in range(1, args.zipf_ranks + 1)]
    else:
        ids = list(range(1, args.count + 1))

    starts = list(range(0, len(ids), args.batch))
    lock = threading.Lock()
    state = {"next": 0, "found": 0, "missing": 0, "failed": None}

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        while True:
            with lock:
                if state["next"] >= len(starts) or state["failed"]:
                    return
                a = starts[state["next"]]
                state["next"] += 1
            if args.by_name:
                path = "/items?name=" + urllib.parse.quote(seeded_name(ids[a]))
            else:
                path = "/items?ids=" + ",".join(str(i) for i in ids[a:a + args.batch])
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                with lock:
                    state["failed"] = f"GET {path[:60]}..: {r.status} {body[:200]!r}"
                return
            doc = json.loads(body)
            if args.by_name:
                found = int([item["id"] for item in doc["items"]] == [ids[a]])
                missing = 1 - found
            else:
                found, missing = len(doc["items"]), len(doc["missing"])
            with lock:
                state["found"] += found
                state["missing"] += missing

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    if state["failed"]:
        print(f"warm failed: {state['failed']}", file=sys.stderr)
        return 1
    print(json.dumps({"requests": len(starts), "seconds": round(took, 2),
                      "found": state["found"], "missing": state["missing"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
