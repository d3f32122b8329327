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
import selectors
import socket
import sys
import time


def parse(buf):
    """(status, headers) once the head and body are complete, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if len(buf) - end - 4 < int(headers.get("content-length", "0")):
        return None
    return int(lines[0].split()[1]), headers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    socks = []
    for _ in range(args.concurrency):
        s = socket.create_connection(("127.0.0.1", args.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    time.sleep(1.0)  # let the server accept every connection before the burst
    request = (f"GET /items/{args.id} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
               "Connection: close\r\n\r\n").encode()

    t0 = time.perf_counter()
    for s in socks:
        s.sendall(request)
    sent = time.perf_counter() - t0

    sel = selectors.DefaultSelector()
    bufs = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
    results = {}
    deadline = t0 + args.timeout
    while len(results) < len(socks) and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except OSError as e:
                results[s] = (None, type(e).__name__, time.perf_counter() - t0)
                sel.unregister(s)
                continue
            if chunk:
                bufs[s] += chunk
                done = parse(bufs[s])
                if done:
                    results[s] = (done[0], done[1].get("x-cache", "-"), time.perf_counter() - t0)
                    sel.unregister(s)
            else:
                done = parse(bufs[s])
                results[s] = (done[0], done[1].get("x-cache", "-"), time.perf_counter() - t0) if done \
                    else (None, "closed", time.perf_counter() - t0)
                sel.unregister(s)
    for s in socks:
        if s not in results:
            results[s] = (None, "timeout", args.timeout)
        s.close()

    statuses, caches, errors, lat = {}, {}, {}, []
    for status, cache, took in results.values():
        if status is None:
            errors[cache] = errors.get(cache, 0) + 1
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        caches[cache] = caches.get(cache, 0) + 1
        lat.append(took)
    lat.sort()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 2) if lat else None

    print(json.dumps({
        "id": args.id,
        "concurrency": args.concurrency,
        "send_spread_ms": round(sent * 1000, 2),
        "statuses": statuses,
        "x_cache": caches,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "latency_ms": {"p50": pct(50), "p99": pct(99), "max": pct(100)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
