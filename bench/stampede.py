#!/usr/bin/env python3
"""Stampede: N concurrent GET /items/{id} for one cold id, all in flight at once.

A load generator that opens its connections as it goes would let the first request
finish (and fill the cache) before the last connection is even open, and "1 query" would
prove nothing. So this opens all N connections first, gives the server a moment to accept
them, then writes every request with plain send() calls in one tight loop (a few ms for
1,000), then reads every response. Prints one JSON object: statuses, X-Cache values,
errors, how long the sending took, and latency percentiles from the first send.

    stampede.py --port P --id ID [--concurrency 1000]
"""

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_options, burst, get_request, latency_ms, tally  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    add_options(ap, "--port", "--id", "--concurrency")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    socks = []
    for _ in range(args.concurrency):
        s = socket.create_connection(("127.0.0.1", args.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    time.sleep(1.0)  # let the server accept every connection before the burst
    request = get_request(f"/items/{args.id}", args.port)
    sent, results = burst([(s, request) for s in socks], args.timeout)

    statuses, caches, errors, lat = tally(results)
    print(json.dumps({
        "id": args.id,
        "concurrency": args.concurrency,
        "send_spread_ms": round(sent * 1000, 2),
        "statuses": statuses,
        "x_cache": caches,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "latency_ms": latency_ms(lat),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
