#!/usr/bin/env python3
"""Warms the cache with every id in 1..N through the service's own batch read
(GET /items?ids=a,...,a+99), a few requests in parallel; fails on any non-200.
Prints one JSON object (requests, seconds, items found, ids missing).

    warm.py --port P --count N [--parallel 8]
"""

import argparse
import http.client
import json
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=8)
    args = ap.parse_args()

    starts = list(range(1, args.count + 1, args.batch))
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
            ids = ",".join(str(i) for i in range(a, min(a + args.batch, args.count + 1)))
            conn.request("GET", f"/items?ids={ids}")
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                with lock:
                    state["failed"] = f"GET /items?ids={a}..: {r.status} {body[:200]!r}"
                return
            doc = json.loads(body)
            with lock:
                state["found"] += len(doc["items"])
                state["missing"] += len(doc["missing"])

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
