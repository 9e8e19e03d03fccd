"""Soak: thousands of WebSockets opening and closing for minutes while pushes flow.

What it checks is not speed but leaks: after minutes of churn -- clean
closes, aborted sockets, clients that never authenticate, clients that stop
reading -- the registry must be empty again and the server's RSS back near
where it was after a warm-up round. Everything is bounded (connections,
rates, duration) and stays on 127.0.0.1.

    python bench/soak.py                       # 3 minutes, 2000 clients
    python bench/soak.py --duration 600 --clients 5000 --churn 500

It starts its own ``twistd push`` on free ports (pinned to core 0 when
``taskset`` exists) and prints a Markdown summary, then the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PROJECT_DIR = Path(__file__).resolve().parent.parent
HANDSHAKE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def masked(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payloads here are short)."""
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + body


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened on the client side."""

    opened: int = 0
    refused: int = 0
    frames: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    ends: Counter[str] = field(default_factory=Counter)


class Client(asyncio.Protocol):
    """One browser: handshake, uid frame, count text frames, answer pings and closes."""

    def __init__(self, uid: str | None, tally: Tally) -> None:
        self.uid = uid
        self.tally = tally
        self.buf = b""
        self.open = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(HANDSHAKE.format(key=key).encode())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf[: self.buf.find(b"\r\n")]
            self.buf = self.buf[end + 4 :]
            if b" 101 " not in status:
                self.tally.refused += 1
                self.abort()
                return
            self.open = True
            self.tally.opened += 1
            if self.uid is not None:
                self.transport.write(masked(0x1, self.uid.encode()))
        while len(self.buf) >= 2:
            n, pos = self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < pos + n:
                return
            opcode, payload = self.buf[0] & 0x0F, self.buf[pos : pos + n]
            self.buf = self.buf[pos + n :]
            if opcode == 0x1:
                self.tally.frames += 1
            elif opcode == 0x9:
                self.transport.write(masked(0xA, payload))
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.tally.closes[code] += 1
                self.transport.write(masked(0x8, payload[:2]))
                self.transport.close()

    def close(self) -> None:
        """A clean close: close frame, then wait for the server to drop the TCP connection."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.open:
            self.transport.write(masked(0x8, struct.pack("!H", 1000)))
        else:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


# --------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------


class Backend(asyncio.Protocol):
    """Pipelines request lines and counts the replies."""

    def __init__(self) -> None:
        self.replies: Counter[bytes] = Counter()
        self.pending = 0
        self.buf = b""
        self.waiters: list[asyncio.Future[bytes]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, line: bytes) -> None:
        self.pending += 1
        self.transport.write(line + b"\n")

    async def ask(self, line: bytes) -> bytes:
        """One request answered after everything pipelined before it."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.send(line)
        return await fut

    def data_received(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.pending -= 1
            if self.waiters and self.pending < len(self.waiters):
                self.waiters.pop(0).set_result(line)
            else:
                self.replies[line if line in (b"ok", b"fail") else b"other"] += 1


# --------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------


@dataclass
class Config:
    duration: float
    clients: int
    churn: float
    push_rate: float
    uids: int
    settle: float


async def open_client(port: int, uid: str | None, tally: Tally) -> Client | None:
    loop = asyncio.get_running_loop()
    try:
        _, client = await loop.create_connection(lambda: Client(uid, tally), HOST, port)
    except OSError:
        tally.ends["connect error"] += 1
        return None
    return client


async def finish(client: Client, how: str, tally: Tally) -> None:
    """End a client one of the ways browsers end."""
    tally.ends[how] += 1
    if how == "clean":
        client.close()
        try:
            await asyncio.wait_for(asyncio.shield(client.done), 5)
        except asyncio.TimeoutError:
            client.abort()
    elif how == "abort":
        client.abort()
    elif how == "stop reading":  # some outlive the server's ping timeout and are dropped
        for _ in range(100):  # authenticate first, then stop reading
            if client.open or client.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        client.transport.pause_reading()
        await asyncio.sleep(random.uniform(5, 25))
        client.abort()


async def stats(backend: Backend) -> dict[str, Any]:
    return json.loads(await backend.ask(b'{"cmd":"stats"}'))


async def soak(ws_port: int, text_port: int, pid: int, cfg: Config) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, backend = await loop.create_connection(Backend, HOST, text_port)
    tally = Tally()
    rss: dict[str, float] = {"idle": rss_mib(pid)}

    # Warm-up round: the allocator's pools grow once; later figures compare to this.
    warm = [await open_client(ws_port, f"u{i % cfg.uids}", tally) for i in range(cfg.clients)]
    await asyncio.sleep(1)
    await asyncio.gather(*(finish(c, "clean", tally) for c in warm if c))
    await asyncio.sleep(cfg.settle)
    rss["after warm-up"] = rss_mib(pid)

    live: set[Client] = set()
    for i in range(cfg.clients):
        c = await open_client(ws_port, f"u{i % cfg.uids}", tally)
        if c:
            live.add(c)
    rss["all connected"] = rss_mib(pid)
    peak = rss["all connected"]
    cpu_start = cpu_seconds(pid)
    started = time.monotonic()
    ending: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = loop.create_task(coro)
        ending.add(task)
        task.add_done_callback(ending.discard)

    sent = 0
    tick = 0.05
    ways = ["clean"] * 70 + ["abort"] * 20 + ["silent"] * 5 + ["stop reading"] * 5
    samples: list[tuple[float, float, int]] = []
    while (elapsed := time.monotonic() - started) < cfg.duration:
        # Churn: replace some clients; one in ten of the new ones misbehaves
        # on top (never authenticates, or stops reading).
        for _ in range(max(1, round(cfg.churn * tick))):
            if live:
                victim = random.choice(tuple(live))
                live.discard(victim)
                spawn(finish(victim, random.choice(ways[:90]), tally))
            c = await open_client(ws_port, f"u{random.randrange(cfg.uids)}", tally)
            if c is not None:
                live.add(c)
            way = random.choice(ways)
            if way == "silent":
                c = await open_client(ws_port, None, tally)  # closed 4008 by the server
            elif way == "stop reading":
                c = await open_client(ws_port, f"u{random.randrange(cfg.uids)}", tally)
                if c is not None:
                    spawn(finish(c, way, tally))
        # Pushes to random uids at the target rate; a broadcast now and then.
        while sent < cfg.push_rate * elapsed:
            uid = random.randrange(cfg.uids)
            backend.send(b'{"uid":"u%d","data":{"seq":%d,"pad":"%s"}}' % (uid, sent, b"x" * 64))
            sent += 1
        if int(elapsed / 10) != int((elapsed - tick) / 10):
            backend.send(b'{"cmd":"broadcast","data":"tick"}')
        if not samples or elapsed - samples[-1][0] >= 5:
            now = rss_mib(pid)
            peak = max(peak, now)
            samples.append((elapsed, now, len(live)))
        await asyncio.sleep(tick)

    cpu = (cpu_seconds(pid) - cpu_start) / (time.monotonic() - started)
    # Wind down: everybody leaves; the registry must empty.
    for c in list(live):
        spawn(finish(c, random.choice(["clean", "abort"]), tally))
    await asyncio.gather(*list(ending), return_exceptions=True)
    deadline = time.monotonic() + 60
    while True:
        st = await stats(backend)
        if st["connections"] == 0 and st["pending"] == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(cfg.settle)
    rss["end"] = rss_mib(pid)
    rss["peak"] = peak
    final = await stats(backend)
    backend.transport.close()
    return {
        "config": cfg.__dict__,
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "server_cpu_share": round(cpu, 2),
        "stats_after": final,
        "pushes_sent": sent,
        "push_replies": {k.decode(): v for k, v in backend.replies.items()},
        "frames_received": tally.frames,
        "connections_opened": tally.opened,
        "refused_handshakes": tally.refused,
        "close_codes": dict(sorted(tally.closes.items())),
        "ends": dict(tally.ends),
        "samples": [(round(t), round(r, 1), n) for t, r, n in samples],
    }


def start_server(extra: list[str], tree: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``twistd push`` from ``tree`` (its pushsvc and plugin first on the path) on free ports."""
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    ws_port, text_port = free_port(), free_port()
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "twistd.log"
    argv = ["twistd", "-n", "--pidfile=", f"--logfile={log}", "push"]
    argv += [f"--ws-port=tcp:{ws_port}:interface={HOST}:backlog=1024"]
    argv += [f"--text-port=tcp:{text_port}:interface={HOST}", "--http-port=off", *extra]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((HOST, text_port), timeout=1).close()
            socket.create_connection((HOST, ws_port), timeout=1).close()
            return proc, ws_port, text_port, log
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {log}") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of churn")
    parser.add_argument("--clients", type=int, default=2000, help="connections held at once")
    parser.add_argument("--churn", type=float, default=200, help="connections replaced a second")
    parser.add_argument("--push-rate", type=float, default=2000, help="pushes a second")
    parser.add_argument("--uids", type=int, default=500, help="distinct uids")
    parser.add_argument("--settle", type=float, default=5, help="seconds before RSS readings")
    parser.add_argument(
        "--tree", type=Path, default=PROJECT_DIR, help="source tree to run (to compare versions)"
    )
    parser.add_argument("server_args", nargs="*", help="extra twistd push options (after --)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * args.clients + 500:
        sys.exit(f"the fd limit ({hard}) is too low for {args.clients} clients")
    cfg = Config(args.duration, args.clients, args.churn, args.push_rate, args.uids, args.settle)
    # Short timeouts so that silent and non-reading clients are reaped within the run.
    server_args = ["--auth-timeout=5", "--ping-interval=10", "--ping-timeout=5", *args.server_args]
    proc, ws_port, text_port, log = start_server(server_args, args.tree.resolve())
    try:
        result = asyncio.run(soak(ws_port, text_port, proc.pid, cfg))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    result["server_args"] = server_args
    result["log_lines"] = sum(1 for _ in open(log, errors="replace"))
    r = result["rss_mib"]
    print(f"## Soak: {cfg.duration:.0f} s, {cfg.clients} clients, {cfg.churn:.0f} replaced/s")
    print()
    print(f"- connections opened: {result['connections_opened']}")
    print(f"- pushes sent: {result['pushes_sent']}, replies {result['push_replies']}")
    print(f"- text frames received by clients: {result['frames_received']}")
    print(f"- close codes seen by clients: {result['close_codes']}")
    print(f"- ends: {result['ends']}")
    print(f"- RSS MiB: {r}")
    print(f"- server CPU during the churn: {result['server_cpu_share']:.0%} of a core")
    print(f"- registry afterwards: {result['stats_after']}")
    print(f"- server log lines: {result['log_lines']}")
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
