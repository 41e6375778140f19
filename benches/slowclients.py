#!/usr/bin/python3
"""The slow-client attack on an app server behind a TLS proxy, and what ordinary requests see meanwhile.

For a given duration it holds:
  - N slow uploaders: POST UPLOAD_PATH with Content-Length UPLOAD_SIZE (1 MiB), then 1 byte every 2 s;
  - M slow readers: GET READ_PATH (a large response) on a socket whose receive buffer is 4 KiB (SO_RCVBUF set
    before connect), reading 1 KiB per second;
and, once they are all in place, sends plain GETs, each on a fresh TCP+TLS connection, a few at a time, each
with its own timeout (5 s). A slow client the proxy answers or cuts off is replaced (so the pressure holds)
unless --no-reconnect. At the end it closes everything and prints one JSON summary on stdout: the plain
GETs (ok / failed, why, p50 / max latency), what the slow clients got (status codes, cut-offs, bytes), and
how long a GET took right after the attack (the app's recovery).

Used by tests/slow_clients.rs (gunicorn -k sync -w 2 behind Portcullis) and benches/slowclients (the same
attack through Portcullis and through nginx). Standard library only; loopback targets only; bounded in time
(duration + the GET timeout + --after) and in connections (--max-gets, --max-slow-connections); it starts
no process and ends none.

Every request carries `from=<role>-<n>` in its query string, so the app's logs say who reached it:
slow-uploader-*, slow-reader-*, plain-*, after-*.
"""

import argparse
import ipaddress
import json
import select
import socket
import ssl
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter


def main():
    args = parse_args()
    target = Target(args)
    run = Attack(args, target)
    summary = run.run()
    json.dump(summary, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="https://HOST:PORT (HOST must resolve to loopback)")
    p.add_argument("--host", help="SNI and Host header (default: the URL's host)")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--ca", help="CA certificate file (PEM) to verify the proxy with")
    v.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--duration", type=float, default=15.0, help="seconds the slow clients are held [15]")
    p.add_argument("--uploaders", type=int, default=8, help="slow uploaders [8]")
    p.add_argument("--upload-path", default="/sink", help="[/sink]")
    p.add_argument("--upload-size", type=int, default=1 << 20, help="declared Content-Length [1 MiB]")
    p.add_argument("--upload-interval", type=float, default=2.0, help="seconds between body bytes [2]")
    p.add_argument("--readers", type=int, default=8, help="slow readers [8]")
    p.add_argument("--read-path", default="/big/8388608", help="a large response [/big/8388608: 8 MiB]")
    p.add_argument("--rcvbuf", type=int, default=4096, help="readers' SO_RCVBUF [4096]")
    p.add_argument("--read-chunk", type=int, default=1024, help="bytes a reader takes per second [1024]")
    p.add_argument("--get-path", default="/", help="[/]")
    p.add_argument("--get-concurrency", type=int, default=2, help="plain GETs in flight at once [2]")
    p.add_argument("--get-interval", type=float, default=0.1, help="pause after each plain GET [0.1 s]")
    p.add_argument("--get-timeout", type=float, default=5.0, help="per plain GET, all included [5 s]")
    p.add_argument("--max-gets", type=int, default=400, help="at most this many plain GETs [400]")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds between the slow clients being in place and the first plain GET [1]")
    p.add_argument("--no-reconnect", action="store_true", help="do not replace slow clients cut off early")
    p.add_argument("--max-slow-connections", type=int, default=200,
                   help="at most this many slow connections in all, replacements included [200]")
    p.add_argument("--after", type=float, default=30.0,
                   help="after the attack, wait up to this long for one GET (0: skip) [30 s]")
    a = p.parse_args()
    for name in ("duration", "upload_interval", "get_timeout"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.duration > 600 or a.after > 600:
        p.error("--duration and --after are at most 600 s")
    if not (0 <= a.uploaders <= 500 and 0 <= a.readers <= 500 and 1 <= a.get_concurrency <= 50):
        p.error("at most 500 uploaders, 500 readers, 50 concurrent GETs")
    if a.read_chunk <= 0 or a.rcvbuf <= 0 or a.upload_size <= 0:
        p.error("--read-chunk, --rcvbuf and --upload-size must be positive")
    return a


class Target:
    """Where to connect (a loopback address), and how to speak TLS to it."""

    def __init__(self, args):
        u = urllib.parse.urlsplit(args.url)
        if u.scheme != "https" or not u.hostname or not u.port:
            sys.exit(f"slowclients: --url must be https://HOST:PORT, not {args.url!r}")
        infos = socket.getaddrinfo(u.hostname, u.port, type=socket.SOCK_STREAM)
        addrs = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
        if not addrs or not all(ipaddress.ip_address(i[4][0]).is_loopback for i in addrs):
            sys.exit(f"slowclients: {u.hostname} must resolve to loopback addresses only")
        # IPv4 first: test listeners are 127.0.0.1 while `localhost` may resolve to ::1 first.
        addrs.sort(key=lambda i: i[0] != socket.AF_INET)
        self.family, _, _, _, self.addr = addrs[0]
        self.host = args.host or u.hostname
        self.port = u.port
        self.authority = self.host if self.port == 443 else f"{self.host}:{self.port}"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_alpn_protocols(["http/1.1"])
        if args.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_verify_locations(cafile=args.ca)
        self.ctx = ctx

    def connect(self, timeout, rcvbuf=None):
        """A TLS connection (handshake done) within `timeout` seconds; SO_RCVBUF set before connect."""
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(timeout)
            s.connect(self.addr)
            t = self.ctx.wrap_socket(s, server_hostname=self.host)
            return t
        except BaseException:
            s.close()
            raise


class Once:
    """Calls `f` the first time it is called, never again: a slow client is 'in place' once its first
    request head is out (or its first attempt failed), whatever happens to it later."""

    def __init__(self, f):
        self.f = f
        self.done = False

    def __call__(self):
        if not self.done:
            self.done = True
            self.f()


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
    if isinstance(e, ssl.SSLError):
        return f"tls: {e.reason or e}"
    if isinstance(e, OSError):
        return f"os: {e.strerror or e}"
    return type(e).__name__


def status_of(head):
    """The status code of an HTTP/1.1 response head, or None."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
        return int(line[1])
    return None


def content_length(head):
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return None


class Attack:
    def __init__(self, args, target):
        self.a = args
        self.t = target
        self.lock = threading.Lock()
        self.slow_budget = args.max_slow_connections
        self.gets_left = args.max_gets
        self.uploads = {"connections": 0, "answered": Counter(), "cut_off": Counter(), "held_to_end": 0,
                        "connect_failed": Counter(), "body_bytes_sent": 0}
        self.reads = {"connections": 0, "answered": Counter(), "cut_off": Counter(), "held_to_end": 0,
                      "complete": 0, "connect_failed": Counter(), "bytes_read": 0}
        self.gets = []  # (ok, ms, reason)
        self.in_place = threading.Semaphore(0)
        self.gets_from = None
        self.gets_until = None

    def run(self):
        a = self.a
        start = time.monotonic()
        self.deadline = start + a.duration
        slow = [threading.Thread(target=self.uploader, args=(i,), daemon=True) for i in range(a.uploaders)]
        slow += [threading.Thread(target=self.reader, args=(i,), daemon=True) for i in range(a.readers)]
        for th in slow:
            th.start()
        # Every slow client has sent its request head (or failed to connect), then a moment for the proxy
        # to pass them on: only then do the plain GETs start. They stop starting one timeout before the end,
        # so each of them is answered (or times out) while the attack still holds.
        for _ in slow:
            self.in_place.acquire(timeout=max(0.0, self.deadline - time.monotonic()))
        in_place_s = time.monotonic() - start
        self.gets_from = time.monotonic() + a.settle
        self.gets_until = self.deadline - a.get_timeout
        getters = [threading.Thread(target=self.getter, args=(i,), daemon=True)
                   for i in range(a.get_concurrency)]
        for th in getters:
            th.start()
        for th in getters + slow:
            th.join(timeout=max(0.0, self.deadline - time.monotonic()) + a.get_timeout + 5)
        attack_s = time.monotonic() - start
        after = self.after() if a.after > 0 else None
        return self.summary(in_place_s, attack_s, after)

    # -- the slow clients ---------------------------------------------------------------------------------

    def take_slow_slot(self):
        with self.lock:
            if self.slow_budget <= 0:
                return False
            self.slow_budget -= 1
            return True

    def uploader(self, i):
        def head(n):
            return (f"POST {self.a.upload_path}?from=slow-uploader-{i}-{n} HTTP/1.1\r\n"
                    f"Host: {self.t.authority}\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {self.a.upload_size}\r\nUser-Agent: slowclients\r\n\r\n")

        self.hold(self.uploads, None, head, self.trickle)

    def reader(self, i):
        sep = "&" if "?" in self.a.read_path else "?"

        def head(n):
            return (f"GET {self.a.read_path}{sep}from=slow-reader-{i}-{n} HTTP/1.1\r\n"
                    f"Host: {self.t.authority}\r\nUser-Agent: slowclients\r\nConnection: close\r\n\r\n")

        self.hold(self.reads, self.a.rcvbuf, head, self.read_slowly)

    def hold(self, stats, rcvbuf, head, play):
        """One slow client's slot until the deadline: connect, send head(n), then play(socket) its part;
        replaced when cut off (unless --no-reconnect), within the connection budget."""
        placed = Once(self.in_place.release)
        n = 0
        while time.monotonic() < self.deadline and self.take_slow_slot():
            try:
                s = self.t.connect(timeout=5, rcvbuf=rcvbuf)
            except Exception as e:
                self.count(stats["connect_failed"], why(e))
                placed()
                self.pause_before_retry()
                continue
            with s:
                with self.lock:
                    stats["connections"] += 1
                try:
                    s.sendall(head(n).encode())
                except Exception as e:
                    self.count(stats["cut_off"], "at head: " + why(e))
                    outcome = "cut"
                else:
                    placed()
                    outcome = play(s)
            n += 1
            placed()
            if outcome == "held" or self.a.no_reconnect:
                break
            self.pause_before_retry()
        placed()

    def trickle(self, s):
        """One body byte per interval until the deadline or the proxy's answer."""
        sent = 0
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                with self.lock:
                    self.uploads["held_to_end"] += 1
                return "held"
            if sent >= self.a.upload_size:
                wait = self.deadline - now  # the whole body went (a long run): wait for the answer
            else:
                wait = min(self.a.upload_interval, self.deadline - now)
            answer = self.answer_within(s, wait)
            if answer is not None:
                kind, value = answer
                self.count(self.uploads["answered" if kind == "status" else "cut_off"], value)
                return "cut"
            if sent < self.a.upload_size:
                try:
                    s.sendall(b"x")
                    sent += 1
                    with self.lock:
                        self.uploads["body_bytes_sent"] += 1
                except Exception as e:
                    self.count(self.uploads["cut_off"], "sending: " + why(e))
                    return "cut"

    def answer_within(self, s, wait):
        """None if nothing came from the proxy within `wait` s; else ("status", "408") or ("cut", reason)."""
        end = time.monotonic() + wait
        got = b""
        while True:
            left = end - time.monotonic()
            if left <= 0 and not got:
                return None
            if not s.pending():
                r, _, _ = select.select([s], [], [], max(0.0, left))
                if not r:
                    if got:
                        break
                    return None
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
            except (socket.timeout, ssl.SSLWantReadError):
                continue  # only TLS records that carry no data (session tickets), or a partial record
            except Exception as e:
                return ("cut", why(e))
            if not data:
                break
            got += data
            if b"\r\n\r\n" in got or len(got) > 16384:
                break
        if not got:
            return ("cut", "closed without an answer")
        code = status_of(got)
        return ("status", str(code)) if code else ("cut", "not HTTP")

    def read_slowly(self, s):
        """READ_CHUNK bytes per second until the deadline or the end of the response."""
        got = b""
        status = None
        body = 0
        length = None
        while True:
            tick = time.monotonic()
            if tick >= self.deadline:
                with self.lock:
                    self.reads["held_to_end"] += 1
                return "held"
            s.settimeout(max(0.01, self.deadline - tick))
            try:
                data = s.recv(self.a.read_chunk)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except Exception as e:
                self.count(self.reads["cut_off"], why(e))
                return "cut"
            if not data:
                if length is not None and body >= length:
                    with self.lock:
                        self.reads["complete"] += 1
                else:
                    self.count(self.reads["cut_off"], "closed before the end")
                return "cut"
            with self.lock:
                self.reads["bytes_read"] += len(data)
            if status is None:
                got += data
                if b"\r\n\r\n" in got:
                    h, _, rest = got.partition(b"\r\n\r\n")
                    status = status_of(h)
                    length = content_length(h)
                    body = len(rest)
                    self.count(self.reads["answered"], str(status))
            else:
                body += len(data)
            if length is not None and body >= length:
                with self.lock:
                    self.reads["complete"] += 1
                return "cut"
            time.sleep(max(0.0, tick + 1.0 - time.monotonic()))

    def pause_before_retry(self):
        time.sleep(min(0.5, max(0.0, self.deadline - time.monotonic())))

    def count(self, counter, key):
        with self.lock:
            counter[key] += 1

    # -- the plain GETs -----------------------------------------------------------------------------------

    def getter(self, i):
        time.sleep(max(0.0, self.gets_from - time.monotonic()))
        n = 0
        while time.monotonic() < self.gets_until:
            with self.lock:
                if self.gets_left <= 0:
                    return
                self.gets_left -= 1
            ok, ms, reason = self.plain_get(f"plain-{i}-{n}", self.a.get_timeout)
            n += 1
            with self.lock:
                self.gets.append((ok, ms, reason))
            time.sleep(self.a.get_interval)

    def plain_get(self, tag, timeout):
        """One GET on a fresh connection within `timeout` s: (ok, milliseconds, reason if not ok)."""
        start = time.monotonic()
        end = start + timeout
        try:
            s = self.t.connect(timeout=timeout)
        except Exception as e:
            return False, (time.monotonic() - start) * 1000, "connect: " + why(e)
        with s:
            sep = "&" if "?" in self.a.get_path else "?"
            req = (f"GET {self.a.get_path}{sep}from={tag} HTTP/1.1\r\nHost: {self.t.authority}\r\n"
                   f"User-Agent: slowclients\r\nConnection: close\r\n\r\n")
            got = b""
            try:
                s.settimeout(max(0.01, end - time.monotonic()))
                s.sendall(req.encode())
                while True:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    s.settimeout(left)
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
                    h, sep2, rest = got.partition(b"\r\n\r\n")
                    if sep2:
                        length = content_length(h)
                        if length is not None and len(rest) >= length:
                            break
            except Exception as e:
                return False, (time.monotonic() - start) * 1000, why(e)
        ms = (time.monotonic() - start) * 1000
        h, sep2, rest = got.partition(b"\r\n\r\n")
        code = status_of(h)
        if not sep2 or code is None:
            return False, ms, "no complete response"
        length = content_length(h)
        if length is not None and len(rest) < length:
            return False, ms, "short body"
        if code != 200:
            return False, ms, f"status {code}"
        return True, ms, None

    def after(self):
        """After the attack: how long one GET takes to succeed (retrying failures), up to --after s."""
        start = time.monotonic()
        end = start + self.a.after
        tries = 0
        last = None
        while time.monotonic() < end:
            tries += 1
            ok, _, reason = self.plain_get(f"after-{tries}", max(0.01, end - time.monotonic()))
            if ok:
                return {"ok": True, "ms": round((time.monotonic() - start) * 1000, 1), "tries": tries}
            last = reason
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return {"ok": False, "ms": round((time.monotonic() - start) * 1000, 1), "tries": tries, "last": last}

    # -- the report ---------------------------------------------------------------------------------------

    def summary(self, in_place_s, attack_s, after):
        ms = sorted(m for ok, m, _ in self.gets if ok)
        failed = Counter(r for ok, _, r in self.gets if not ok)
        all_ms = sorted(m for _, m, _ in self.gets)

        def plain(d):
            return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in d.items()}

        return {
            "target": f"https://{self.t.authority} ({self.t.addr[0]})",
            "duration_s": self.a.duration,
            "slow_clients_in_place_s": round(in_place_s, 2),
            "attack_s": round(attack_s, 2),
            "plain_gets": {
                "ok": len(ms),
                "failed": sum(failed.values()),
                "failures": dict(failed),
                "p50_ms": round(statistics.median(all_ms), 1) if all_ms else None,
                "max_ms": round(all_ms[-1], 1) if all_ms else None,
                "ok_p50_ms": round(statistics.median(ms), 1) if ms else None,
                "ok_max_ms": round(ms[-1], 1) if ms else None,
                "timeout_s": self.a.get_timeout,
            },
            "slow_uploaders": dict(plain(self.uploads), count=self.a.uploaders,
                                   declared_bytes=self.a.upload_size),
            "slow_readers": dict(plain(self.reads), count=self.a.readers, path=self.a.read_path),
            "after_attack": after,
        }


if __name__ == "__main__":
    sys.exit(main())
