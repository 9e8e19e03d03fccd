"""Issue 11's attacks, each against a fresh ``twistd push``, while a legitimate client is served.

Each attack runs for a bounded time (``--seconds``, default 8: past the 5 s
handshake deadline) with a bounded number of sockets from 127.0.0.2
(127.0.0.x for the many-address ones) against a server on 127.0.0.1
started on free ports for that attack alone.
Meanwhile a client on 127.0.0.1 connects and receives a push every 0.2 s.
Per attack it prints: the server's RSS at start and its peak, its peak
descriptor count (/proc/PID/status VmRSS and /proc/PID/fd, sampled every
50 ms), how long attacking sockets lived (open to server close: median and
max; "open" if the server had not closed them when the attack ended), the
bytes the server's log grew, and whether the legitimate client was served
(connected, and received every push), and whether ``/healthz`` and the
backend port answered at the end of the attack.  The "side" column says
which half of issue 11 built the server's defence (A: WebSocket handshakes,
caps and descriptors; B: backend port, HTTP API, parsing and log floods).

    python bench/abuse.py                  # every attack, about two minutes
    python bench/abuse.py --only header_bomb half_open
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jwt
from websockets.sync.client import connect

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))
from rawws import frame, request  # noqa: E402

ATTACKER = "127.0.0.2"
STARTING = re.compile(rb"\] (WebSocket|backend|HTTP) on [^ ]*:(\d+)$", re.MULTILINE)
SECRET = "s" * 40


class Server:
    """``twistd -n push`` on free 127.0.0.1 ports, optionally under ``ulimit -n``."""

    def __init__(self, workdir: Path, args: list[str], nofile: int | None = None) -> None:
        self.log = workdir / "twistd.log"
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        env.pop("PUSHSVC_SECRET", None)
        cmd = [
            *("twistd", "-n", "--pidfile=", f"--logfile={self.log}", "push"),
            "--ws-port=tcp:0:interface=127.0.0.1",
            "--text-port=tcp:0:interface=127.0.0.1",
            "--http-port=tcp:0:interface=127.0.0.1",
            *args,
        ]
        limit = (
            (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
            if nofile
            else None
        )
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, preexec_fn=limit)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ports = {k.decode(): int(v) for k, v in STARTING.findall(self.log_bytes())}
            if len(ports) == 3:
                self.ws, self.text, self.http = ports["WebSocket"], ports["backend"], ports["HTTP"]
                return
            time.sleep(0.05)
        raise RuntimeError(self.log_bytes().decode(errors="replace"))

    def log_bytes(self) -> bytes:
        return self.log.read_bytes() if self.log.exists() else b""

    def sample(self) -> tuple[int, int]:
        """(VmRSS in KiB, open descriptors)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def sock(port: int, source: str = ATTACKER) -> socket.socket | None:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s


class Watch:
    """Attacking sockets: when each opened and when the server closed it."""

    def __init__(self) -> None:
        self.opened: dict[socket.socket, float] = {}
        self.lived: list[float] = []

    def add(self, s: socket.socket | None) -> socket.socket | None:
        if s is not None:
            self.opened[s] = time.monotonic()
        return s

    def poll(self) -> None:
        for s, t in list(self.opened.items()):
            try:
                while s.recv(65536):
                    pass
            except BlockingIOError:
                continue
            except OSError:
                pass
            self.lived.append(time.monotonic() - t)
            del self.opened[s]
            s.close()

    def send(self, s: socket.socket, data: bytes) -> None:
        try:
            s.send(data)
        except OSError:
            pass

    def summary(self) -> str:
        self.poll()
        still = len(self.opened)
        for s in self.opened:
            s.close()
        if not self.lived:
            return f"{still} open"
        med, top = statistics.median(self.lived), max(self.lived)
        return f"{med:.2f}/{top:.2f} s" + (f", {still} open" if still else "")


def legit(server: Server, stop: threading.Event, result: dict) -> None:
    """Connect from 127.0.0.1 and receive a push every 0.2 s until ``stop``."""
    uid, sent, got = "legit-client", 0, 0
    try:
        with connect(f"ws://127.0.0.1:{server.ws}/", open_timeout=5) as c:
            secret = "--secret-file" in " ".join(result["args"])
            exp = int(time.time()) + 3600
            c.send(jwt.encode({"sub": uid, "exp": exp}, SECRET, "HS256") if secret else uid)
            with socket.create_connection(("127.0.0.1", server.text), timeout=5) as b:
                f = b.makefile("rb")
                if secret:
                    b.sendall(json.dumps({"cmd": "auth", "secret": SECRET}).encode() + b"\n")
                    f.readline()
                while not stop.is_set():
                    b.sendall(json.dumps({"uid": uid, "data": f"p{sent}"}).encode() + b"\n")
                    if f.readline().strip() == b"ok":
                        sent += 1
                        got += c.recv(timeout=5) == f"p{sent - 1}"
                    stop.wait(0.2)
        result["served"] = sent > 0 and got == sent
    except Exception as e:  # noqa: BLE001 - any failure means not served
        result["served"] = f"no ({type(e).__name__})"


def header_bomb(server: Server, watch: Watch, until: float) -> None:
    socks = [watch.add(sock(server.ws)) for _ in range(50)]
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    for s in filter(None, socks):
        watch.send(s, b"GET / HTTP/1.1\r\n")
    while time.monotonic() < until and watch.opened:
        for s in list(watch.opened):
            watch.send(s, line)
        watch.poll()


def hold(server: Server, watch: Watch, until: float, port: int, n: int, first: bytes) -> None:
    for _ in range(n):
        s = watch.add(sock(port))
        if s is not None:
            watch.send(s, first)
    while time.monotonic() < until:
        watch.poll()
        time.sleep(0.05)


def trickle(server: Server, watch: Watch, until: float) -> None:
    idle = [watch.add(sock(server.http)) for _ in range(50)]
    slow = [watch.add(sock(server.http)) for _ in range(50)]
    for s in filter(None, slow):
        watch.send(s, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    while time.monotonic() < until:
        for s in filter(None, slow):
            if s in watch.opened:
                watch.send(s, b"X-Slow: 1\r\n")
        watch.poll()
        time.sleep(0.5)
    del idle


def deep_nesting(server: Server, watch: Watch, until: float) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    while time.monotonic() < until:
        s = watch.add(sock(server.text))
        if s is not None:
            s.setblocking(True)
            watch.send(s, deep.encode() + b"\n")
            s.setblocking(False)
        w = watch.add(sock(server.ws))
        if w is not None:
            w.setblocking(True)
            watch.send(w, request() + frame(1, ('{"uid":' + deep[:2000] + "}").encode()))
            w.setblocking(False)
        watch.poll()
        time.sleep(0.05)


def ws_flood(payloads: list[bytes]) -> Callable[[Server, Watch, float], None]:
    def attack(server: Server, watch: Watch, until: float) -> None:
        i = 0
        while time.monotonic() < until and i < 2000:
            s = watch.add(sock(server.ws))
            if s is not None:
                s.setblocking(True)
                watch.send(s, request() + payloads[i % len(payloads)])
                s.setblocking(False)
            i += 1
            if i % 50 == 0:
                watch.poll()

    return attack


def many_ips(server: Server, watch: Watch, until: float) -> None:
    bad = json.dumps({"cmd": "auth", "secret": "wrong"}).encode() + b"\n"
    i = 0
    while time.monotonic() < until and i < 2000:
        source = f"127.0.0.{10 + i % 200}"
        s = watch.add(sock(server.text, source))
        if s is not None:
            watch.send(s, bad)
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.http}/api/stats", headers={"Authorization": "Bearer wrong"}
        )
        try:
            urllib.request.urlopen(req, timeout=2).close()
        except (urllib.error.URLError, OSError):
            pass
        i += 1
        watch.poll()


def still_answers(server: Server) -> str:
    """Whether /healthz and the backend port answer now (during the attack)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/healthz", timeout=5) as r:
            health = str(r.status)
    except (urllib.error.URLError, OSError) as e:
        health = type(e).__name__
    try:
        with socket.create_connection(("127.0.0.1", server.text), timeout=5) as b:
            b.sendall(b'{"cmd":"stats"}\n')
            backend = "ok" if b.makefile("rb").readline() else "closed"
    except OSError as e:
        backend = type(e).__name__
    return f"{health}/{backend}"


def secret_files(workdir: Path) -> list[str]:
    path = workdir / "secret"
    path.write_text(SECRET)
    return [f"--backend-secret-file={path}", f"--api-key-file={path}", f"--secret-file={path}"]


# name: (attack, server arguments, ulimit -n, whose server side)
ATTACKS: dict[str, tuple[Callable[[Server, Watch, float], None], list[str], int | None, str]] = {
    "header_bomb": (header_bomb, [], None, "A"),
    "half_open": (
        lambda s, w, u: hold(s, w, u, s.ws, 300, b"GET / HTTP/1.1\r\n"),
        ["--max-per-ip=5", "--max-connections=200"],
        None,
        "A",
    ),
    "fd_exhaustion": (
        lambda s, w, u: hold(s, w, u, s.ws, 600, b"GET / HTTP/1.1\r\n"),
        [],
        256,
        "A",
    ),
    "ws_idle_trickle": (trickle, [], None, "A"),
    "backend_silent": (
        lambda s, w, u: hold(s, w, u, s.text, 200, b""),
        ["SECRETS"],
        None,
        "B",
    ),
    "deep_nesting": (deep_nesting, [], None, "B"),
    "bad_tokens": (ws_flood([frame(1, b"not.a.token")]), ["SECRETS"], None, "B"),
    "1007_1009": (ws_flood([frame(1, b"\xff\xfe"), frame(1, b"x" * 70000)]), [], None, "B"),
    "failed_secrets_many_ips": (many_ips, ["SECRETS"], None, "B"),
}


def run(name: str, seconds: float) -> dict:
    attack, args, nofile, side = ATTACKS[name]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args = [a for arg in args for a in (secret_files(workdir) if arg == "SECRETS" else [arg])]
        server = Server(workdir, args, nofile)
        try:
            rss0, _ = server.sample()
            log0 = len(server.log_bytes())
            peaks = [rss0, 0]
            stop = threading.Event()

            def sampler() -> None:
                while not stop.wait(0.05):
                    rss, fds = server.sample()
                    peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], fds)

            result: dict = {"args": args}
            threads = [
                threading.Thread(target=sampler),
                threading.Thread(target=legit, args=(server, stop, result)),
            ]
            for t in threads:
                t.start()
            time.sleep(0.3)
            watch = Watch()
            until = time.monotonic() + seconds
            attack(server, watch, until)
            while time.monotonic() < until:  # an attack that used its count early
                watch.poll()
                time.sleep(0.05)
            answers = still_answers(server)
            lived = watch.summary()
            stop.set()
            for t in threads:
                t.join()
            return {
                "attack": name,
                "side": side,
                "rss_mib": f"{rss0 / 1024:.0f}->{peaks[0] / 1024:.0f}",
                "fds_peak": peaks[1],
                "fd_limit": nofile or "-",
                "socket_lived": lived,
                "log_bytes": len(server.log_bytes()) - log0,
                "legit_served": result.get("served"),
                "healthz_backend": answers,
            }
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only", nargs="*", choices=list(ATTACKS))
    options = parser.parse_args()
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    columns = [
        "attack",
        "side",
        "rss_mib",
        "fds_peak",
        "fd_limit",
        "socket_lived",
        "log_bytes",
        "legit_served",
        "healthz_backend",
    ]
    print(" | ".join(columns))
    for name in options.only or ATTACKS:
        row = run(name, options.seconds)
        print(" | ".join(str(row[c]) for c in columns), flush=True)


if __name__ == "__main__":
    main()
