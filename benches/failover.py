#!/usr/bin/python3
"""The client side of benches/failover: keep-alive clients through a TLS proxy while one app instance behind it
is killed and restarted, and what they saw.

Three commands:
  load       CLIENTS keep-alive HTTP/1.1 clients, each on one TLS connection (reopened only when it breaks or
             the proxy closes it), sending requests one after the other from --start-at for --duration
             seconds: `GET /`, or `POST /work` with a unique `X-Request-Id` (ID_PREFIX + c<client>-<n>) that
             the app (tests/fixtures/flask_failover.py) appends to its work log before doing its work. Every
             request is written to --records as a TSV line: end, start (Unix time, seconds), client, n,
             ok (1: status 200), the instance that answered (the body) or what went wrong, the id.
  wait-open  Polls ADDR (127.0.0.1:PORT or unix:PATH) every 2 ms until it accepts a connection and prints that
             moment (Unix time); with --ready-file, creates that file once polling has begun (so that the
             caller starts the app only then, and the moment is not missed).
  summary    Reads the records, the events file (key=value lines: start, killed, restarted, reopened, end, as
             Unix times) and for POSTs the work log, and prints one JSON summary: requests ok / failed (and
             why, and when), per instance before the kill / while it was dead / after its port reopened, how
             long after the port reopened the restarted instance answered its first request, ids the app
             executed twice, failed POSTs the app executed anyway, the slowest request.

Standard library only; loopback targets only; bounded in time (--duration <= 300 s, each request --timeout)
and in requests (--max-requests); it starts no process and ends none. The caller (benches/failover) starts,
kills and restarts the instances and the proxies.
"""

import argparse
import http.client
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections import Counter


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="the keep-alive clients")
    load.add_argument("--url", required=True, help="https://HOST:PORT (HOST must resolve to loopback)")
    load.add_argument("--ca", required=True, help="CA certificate (PEM) to verify the proxy with")
    load.add_argument("--method", choices=["GET", "POST"], default="GET")
    load.add_argument("--clients", type=int, default=6, help="[6]")
    load.add_argument("--start-at", type=float, help="Unix time of the first request [now]")
    load.add_argument("--duration", type=float, default=15.0, help="seconds [15]")
    load.add_argument("--timeout", type=float, default=10.0, help="per request, connect included [10 s]")
    load.add_argument("--max-requests", type=int, default=2_000_000, help="in all [2,000,000]")
    load.add_argument("--id-prefix", default="", help="before each POST id (one per run)")
    load.add_argument("--records", required=True, help="TSV file to write")

    wait = sub.add_parser("wait-open", help="the moment an address accepts connections")
    wait.add_argument("addr", help="127.0.0.1:PORT or unix:PATH")
    wait.add_argument("--timeout", type=float, default=30.0, help="[30 s]")
    wait.add_argument("--ready-file")

    summ = sub.add_parser("summary", help="what the clients saw, as JSON")
    summ.add_argument("--records", required=True)
    summ.add_argument("--events", required=True)
    summ.add_argument("--work-log", help="the app's work log (POST runs)")
    summ.add_argument("--instances", default="g1,g2,g3")
    summ.add_argument("--killed", default="g1", help="the instance killed and restarted [g1]")

    a = p.parse_args()
    if a.command == "load":
        if not (1 <= a.clients <= 64 and 0 < a.duration <= 300 and 0 < a.timeout <= 60):
            p.error("1..64 clients, a duration of at most 300 s, a timeout of at most 60 s")
        return run_load(a)
    if a.command == "wait-open":
        return wait_open(a)
    return summary(a)


# -- load -------------------------------------------------------------------------------------------------


def loopback_target(url):
    """(host for SNI and Host, port, IPv4/IPv6 loopback address to dial) of an https:// URL."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname or not u.port:
        sys.exit(f"failover: --url must be https://HOST:PORT, not {url!r}")
    infos = socket.getaddrinfo(u.hostname, u.port, type=socket.SOCK_STREAM)
    addrs = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addrs or not all(ipaddress.ip_address(i[4][0]).is_loopback for i in addrs):
        sys.exit(f"failover: {u.hostname} must resolve to loopback addresses only")
    # IPv4 first: the proxies listen on 127.0.0.1 while `localhost` may resolve to ::1 first.
    addrs.sort(key=lambda i: i[0] != socket.AF_INET)
    return u.hostname, u.port, addrs[0][4][0]


class Connection(http.client.HTTPSConnection):
    """An HTTPS connection to a fixed loopback address, with the URL's host as SNI and Host."""

    def __init__(self, host, port, dial, context, timeout):
        super().__init__(host, port, context=context, timeout=timeout)
        self.dial = dial

    def connect(self):
        s = socket.create_connection((self.dial, self.port), self.timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self._context.wrap_socket(s, server_hostname=self.host)
        except BaseException:
            s.close()
            raise


def why(e):
    """A short name for what went wrong, for counting."""
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "broken pipe"
    if isinstance(e, http.client.RemoteDisconnected):
        return "closed without a response"
    if isinstance(e, http.client.IncompleteRead):
        return "short body"
    if isinstance(e, ssl.SSLError):
        return f"tls: {e.reason or e}"
    if isinstance(e, OSError):
        return f"os: {e.strerror or e}"
    return type(e).__name__


def run_load(a):
    host, port, dial = loopback_target(a.url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_verify_locations(cafile=a.ca)
    start = a.start_at if a.start_at else time.time()
    end = start + a.duration
    lock = threading.Lock()
    budget = [a.max_requests]
    records = [[] for _ in range(a.clients)]
    path = "/work" if a.method == "POST" else "/"

    def client(c):
        out = records[c]
        conn = None
        n = 0
        time.sleep(max(0.0, start - time.time()))
        while time.time() < end:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            rid = f"{a.id_prefix}c{c}-{n}"
            headers = {"User-Agent": "failover-bench"}
            body = None
            if a.method == "POST":
                headers["X-Request-Id"] = rid
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                body = b"x=1"
            t0 = time.time()
            try:
                if conn is None:
                    conn = Connection(host, port, dial, ctx, a.timeout)
                conn.request(a.method, path, body=body, headers=headers)
                res = conn.getresponse()
                data = res.read()
                if res.will_close:
                    conn.close()
                    conn = None
                if res.status == 200:
                    ok, who = True, data.decode("utf-8", "replace").strip() or "?"
                else:
                    ok, who = False, f"status {res.status}"
            except Exception as e:  # noqa: BLE001 - every failure is counted, by kind
                ok, who = False, why(e)
                if conn is not None:
                    conn.close()
                conn = None
            out.append((time.time(), t0, c, n, ok, who, rid if a.method == "POST" else "-"))
            n += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, end - time.time()) + a.timeout + 5)
    with open(a.records, "w") as f:
        for rs in records:
            for end_t, t0, c, n, ok, who, rid in rs:
                who = who.replace("\t", " ").replace("\n", " ")
                f.write(f"{end_t:.6f}\t{t0:.6f}\t{c}\t{n}\t{int(ok)}\t{who}\t{rid}\n")
    total = sum(len(rs) for rs in records)
    failed = sum(1 for rs in records for r in rs if not r[4])
    json.dump({"requests": total, "failed": failed, "clients": a.clients, "method": a.method}, sys.stdout)
    sys.stdout.write("\n")
    return 0


# -- wait-open --------------------------------------------------------------------------------------------


def wait_open(a):
    if a.addr.startswith("unix:"):
        family, target = socket.AF_UNIX, a.addr[len("unix:"):]
    else:
        h, _, port = a.addr.rpartition(":")
        if not ipaddress.ip_address(h).is_loopback:
            sys.exit(f"failover: {a.addr} is not a loopback address")
        family, target = socket.AF_INET, (h, int(port))
    if a.ready_file:
        open(a.ready_file, "w").close()
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(target)
            at = time.time()
            print(f"{at:.6f}")
            return 0
        except OSError:
            time.sleep(0.002)
        finally:
            s.close()
    print(f"failover: {a.addr} did not accept a connection within {a.timeout} s", file=sys.stderr)
    return 1


# -- summary ----------------------------------------------------------------------------------------------


def summary(a):
    events = {}
    with open(a.events) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k:
                events[k] = float(v)
    start, killed, reopened = events["start"], events["killed"], events["reopened"]
    end = events.get("end", start)
    names = a.instances.split(",")
    rows = []
    with open(a.records) as f:
        for line in f:
            end_t, t0, c, n, ok, who, rid = line.rstrip("\n").split("\t")
            rows.append((float(end_t), float(t0), int(c), int(n), ok == "1", who, rid))
    rows.sort()

    phases = {"before": Counter(), "during": Counter(), "after": Counter()}
    failures = Counter()
    failure_times = []
    back = None
    slowest = 0.0
    for end_t, t0, _, _, ok, who, _ in rows:
        phase = "before" if end_t < killed else "during" if end_t < reopened else "after"
        phases[phase][who if ok else "FAILED"] += 1
        slowest = max(slowest, end_t - t0)
        if not ok:
            failures[who] += 1
            failure_times.append(round(end_t - start, 2))
        elif phase == "after" and who == a.killed and back is None:
            back = end_t - reopened

    out = {
        "requests": len(rows),
        "ok": sum(1 for r in rows if r[4]),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "failure_times_s": failure_times[:40],
        "phases": {p: counts(c, names) for p, c in phases.items()},
        "killed_at_s": round(killed - start, 3),
        "restarted_at_s": round(events["restarted"] - start, 3),
        "port_open_ms": round((reopened - events["restarted"]) * 1000),
        "back_ms": round(back * 1000) if back is not None else None,
        "after_restart_s": round(end - reopened, 2),
        "slowest_ms": round(slowest * 1000, 1),
    }
    if a.work_log is not None:
        seen = Counter()
        by_instance = Counter()
        if os.path.exists(a.work_log):
            with open(a.work_log) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2:
                        seen[parts[0]] += 1
                        by_instance[parts[1]] += 1
        failed_ids = {r[6] for r in rows if not r[4]}
        ok_ids = {r[6] for r in rows if r[4]}
        out["post"] = {
            "executed": len(seen),
            "executed_twice": sum(1 for n in seen.values() if n > 1),
            "twice_ids": sorted(rid for rid, n in seen.items() if n > 1)[:20],
            "failed_but_executed": sum(1 for rid in failed_ids if rid in seen),
            "ok_not_executed": sum(1 for rid in ok_ids if rid not in seen),
            "executed_by_instance": dict(sorted(by_instance.items())),
        }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def counts(c, names):
    """Requests per instance (every one named, zeros included), then FAILED, then any other answer."""
    out = {n: c.get(n, 0) for n in names}
    out["FAILED"] = c.get("FAILED", 0)
    out.update({k: v for k, v in sorted(c.items()) if k not in out})
    return out


if __name__ == "__main__":
    sys.exit(main())
