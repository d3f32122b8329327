"""Pieces the bench/*.py helpers share (imported, never run): /proc readings (a process's and
a process tree's CPU seconds, RSS, the machine's jiffies), /metrics parsing, a bare Redis
client, raw HTTP bursts (requests written back to back on connections opened first, then
every response read), the 1-second-style sampling loop, and argument-parsing helpers.

The helpers are run as `python3 bench/x.py` (by bench/run, bench/near, bench/fleet), so
bench/ is sys.path[0] and `import common` finds this file; scripts that may be imported from
elsewhere add their own directory to sys.path first. Standard library only: sample.py and
near.py may run on the system Python, without the bench venv's psycopg.
"""

import http.client
import json
import os
import re
import selectors
import signal
import socket
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- /proc ----------------------------------------------------------------------------------


def read_pid(pidfile):
    """The pid on a pidfile's first line (a postmaster.pid too) if that process lives, else None."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def stat_fields(pid):
    """/proc/<pid>/stat after the command name: [0] is the state (field 3), [1] the ppid,
    [11] and [12] utime and stime, [13] and [14] cutime and cstime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_s(pid):
    """utime + stime of one process, seconds; None if it is gone."""
    try:
        f = stat_fields(pid)
        return (int(f[11]) + int(f[12])) / CLK_TCK
    except OSError:
        return None


def tree_cpu_s(parent):
    """CPU seconds of a server and its children: the parent's own and its reaped children's
    (cutime + cstime), plus every live child's. Continuous as backends come and go."""
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


def status_fields(pid, names):
    """{names[key]: int} of the /proc/<pid>/status lines whose key is in names (e.g.
    {"VmRSS": "rss_kib"}; kB for the Vm* ones), in the file's order. Raises OSError if the
    process is gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in names:
                out[names[key]] = int(line.split()[1])
    return out


def rss_kib(pid):
    try:
        return status_fields(pid, {"VmRSS": "rss_kib"}).get("rss_kib")
    except OSError:
        return None


def machine_jiffies():
    """(busy, total) jiffies of the whole machine from /proc/stat: user .. steal, busy
    without idle and iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


# --- /metrics -------------------------------------------------------------------------------

LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def get_metrics(port, timeout):
    """The service's /metrics text, over one http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric_samples(text, raw_labels=False):
    """(name, labels, value) of every sample line of a Prometheus text: labels as a dict, or
    with raw_labels the text between the braces ("" without)."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = m.group(2) or ""
        yield m.group(1), labels if raw_labels else dict(LABEL.findall(labels)), float(m.group(3))


def count_metrics(text, out, counters):
    """Fills out from a /metrics text: counters maps a metric name to (key, label): the
    sample's value goes to out[key][its label's value] (label None: to out[key]). Returns
    the other samples, (name, labels, value) each, for the caller's own cases."""
    rest = []
    for name, labels, value in metric_samples(text):
        spec = counters.get(name)
        if spec is None:
            rest.append((name, labels, value))
        elif spec[1] is None:
            out[spec[0]] = value
        else:
            out[spec[0]][labels.get(spec[1], "")] = value
    return rest


# --- sampling loops -------------------------------------------------------------------------


class Stop:
    """A flag the given signals set (by default SIGTERM and SIGINT): a loop's end."""

    def __init__(self, *signals):
        self.set = False
        for s in signals or (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on)

    def _on(self, *_):
        self.set = True


def ticks(interval, stop):
    """Yields every `interval` s (on a fixed schedule from now; after an overrun the schedule
    restarts) until `stop` is set; checked before each tick."""
    next_t = time.time()
    while not stop.set:
        yield
        next_t += interval
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.time()


def append_jsonl(out, doc):
    out.write(json.dumps(doc, separators=(",", ":")) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- Redis ----------------------------------------------------------------------------------


class Redis:
    """A bare RESP client on one connection: send() commands (pipelined), reply() in order,
    or call() one."""

    def __init__(self, port, nodelay=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, *args):
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(parts))

    def call(self, *args):
        self.send(*args)
        return self.reply()

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


# --- raw HTTP -------------------------------------------------------------------------------


def parse_head(buf):
    """(status, headers (lower-case names), end of the head, Content-Length) once a
    response's head is complete in buf, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, end + 4, int(headers.get("content-length", "0"))


def parse_response(buf):
    """(status, headers) once the head and body are complete, else None."""
    head = parse_head(buf)
    if head is None or len(buf) - head[2] < head[3]:
        return None
    return head[0], head[1]


def get_request(path, port):
    """One GET with Connection: close, as bytes."""
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Connection: close\r\n\r\n").encode()


def burst(conns, timeout):
    """The stampede's burst: every (socket, request) of conns written back to back with plain
    sendall() calls in one tight loop, then every response read (one selector, non-blocking).
    Returns (seconds the writing took, {socket: (status, X-Cache, seconds from the first send)});
    a failed socket's status is None and its X-Cache the kind of failure (an exception's
    name, "closed", "timeout": then the seconds are `timeout`). Closes every socket."""
    t0 = time.perf_counter()
    for s, request in conns:
        s.sendall(request)
    sent = time.perf_counter() - t0

    sel = selectors.DefaultSelector()
    bufs = {}
    for s, _ in conns:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
    results = {}
    deadline = t0 + timeout
    while len(results) < len(conns) and time.perf_counter() < deadline:
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
                done = parse_response(bufs[s])
                if done:
                    results[s] = (done[0], done[1].get("x-cache", "-"), time.perf_counter() - t0)
                    sel.unregister(s)
            else:
                done = parse_response(bufs[s])
                results[s] = ((done[0], done[1].get("x-cache", "-"), time.perf_counter() - t0) if done
                              else (None, "closed", time.perf_counter() - t0))
                sel.unregister(s)
    for s, _ in conns:
        if s not in results:
            results[s] = (None, "timeout", timeout)
        s.close()
    return sent, results


def tally(results):
    """statuses, X-Cache values and error kinds (counts, in the order met) of burst()'s
    results, and the answered requests' latencies (s), sorted."""
    statuses, caches, errors, lat = {}, {}, {}, []
    for status, cache, took in results.values():
        if status is None:
            errors[cache] = errors.get(cache, 0) + 1
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        caches[cache] = caches.get(cache, 0) + 1
        lat.append(took)
    lat.sort()
    return statuses, caches, errors, lat


def latency_ms(lat):
    """p50, p99 and max (ms) of sorted latencies in seconds."""
    def pct(p):
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 2) if lat else None

    return {"p50": pct(50), "p99": pct(99), "max": pct(100)}


# --- command lines --------------------------------------------------------------------------

# Options several helpers take, always with the same meaning and spec.
OPTIONS = {
    "--port": dict(type=int, required=True),
    "--redis-port": dict(type=int, required=True),
    "--dsn": dict(required=True),
    "--out": dict(required=True),
    "--label": dict(required=True),
    "--id": dict(type=int, required=True),
    "--concurrency": dict(type=int, default=1000),
}


def add_options(parser, *names):
    """Adds the named OPTIONS to an argparse parser, in that order."""
    for name in names:
        parser.add_argument(name, **OPTIONS[name])


def run_subcommand(parser, dest, commands):
    """Parses the command line and runs the chosen subcommand's function: its return value."""
    args = parser.parse_args()
    return commands[getattr(args, dest)](args)


def command_after_dashes(command):
    """argparse.REMAINDER's list without a leading "--"."""
    return command[1:] if command and command[0] == "--" else command
