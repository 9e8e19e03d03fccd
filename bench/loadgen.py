"""Load generator for the push protocol: many browsers and a few backends.

Why hand-written: driving 10,000 WebSocket clients from one core rules out a
full client library per connection.  Each simulated browser is a bare
``asyncio.Protocol`` that performs the minimal client handshake, sends its uid
as one masked text frame and parses the server's (unmasked) frames itself.
Backends are asyncio Protocols that pipeline JSON request lines on the text
port and count the reply lines.

Every scenario counts and checks every frame and every reply, and measures
the server (CPU from ``/proc/<pid>/stat``, RSS from ``/proc/<pid>/status``)
and the generator itself (``time.process_time``) over the same window.

Standalone use against an already running server (the runner in ``run.py``
normally drives this module)::

    python bench/loadgen.py --ws-port 8001 --text-port 8002 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Generator CPU share above which a figure says more about the generator than
# about the server.
GENERATOR_BOUND = 0.90


class BenchError(Exception):
    """A scenario could not complete or saw a wrong frame or reply."""


# --------------------------------------------------------------------------
# Measuring the server process and ourselves
# --------------------------------------------------------------------------


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """Return (utime, stime) of ``pid`` in seconds (children not included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may contain spaces; fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_switches(pid: int) -> int:
    """Context switches of ``pid`` so far, voluntary (waits, e.g. in epoll) and not."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[-1]) for line in f if "ctxt_switches:" in line)


def proc_cpu_seconds(pid: int) -> float:
    """Return utime + stime of ``pid`` in seconds (children not included)."""
    return sum(proc_cpu_split(pid))


def proc_rss_kib(pid: int) -> int:
    """Return the resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Window:
    """Wall time, server CPU and generator CPU spent between start() and stop().

    The server's CPU is the sum over ``pid`` and ``extra`` (the other nodes
    and Redis of a cluster); ``parts`` keeps each process's share.
    """

    pid: int
    extra: tuple[int, ...] = ()
    wall: float = 0.0
    server_cpu: float = 0.0
    gen_cpu: float = 0.0
    t0: float = 0.0
    parts: tuple[float, ...] = ()
    server_sys: float = 0.0
    switches: tuple[int, ...] = ()
    _cpu0: tuple[tuple[float, ...], float, float] = ((), 0.0, 0.0)
    _switches0: tuple[int, ...] = ()

    def _server(self) -> tuple[tuple[float, ...], float]:
        split = [proc_cpu_split(pid) for pid in (self.pid, *self.extra)]
        return tuple(u + s for u, s in split), sum(s for _, s in split)

    def start(self) -> None:
        """Take the opening readings."""
        self.t0 = time.perf_counter()
        cpu, sys_cpu = self._server()
        self._cpu0 = (cpu, sys_cpu, time.process_time())
        self._switches0 = tuple(proc_switches(p) for p in (self.pid, *self.extra))

    def stop(self) -> None:
        """Take the closing readings."""
        self.wall = time.perf_counter() - self.t0
        cpu, sys_cpu = self._server()
        self.parts = tuple(b - a for a, b in zip(self._cpu0[0], cpu, strict=True))
        self.server_cpu = sum(self.parts)
        self.server_sys = sys_cpu - self._cpu0[1]
        self.gen_cpu = time.process_time() - self._cpu0[2]
        now = tuple(proc_switches(p) for p in (self.pid, *self.extra))
        self.switches = tuple(b - a for a, b in zip(self._switches0, now, strict=True))

    def figures(self, count: int, unit: str) -> dict[str, Any]:
        """Rate, server CPU per unit and both processes' CPU share."""
        gen_share = self.gen_cpu / self.wall
        result = {
            "count": count,
            f"{unit}_per_s": count / self.wall,
            f"server_cpu_us_per_{unit}": self.server_cpu / count * 1e6,
            "server_cpu_pct": 100 * self.server_cpu / self.wall,
            "server_sys_pct_of_cpu": 100 * self.server_sys / max(self.server_cpu, 1e-9),
            "gen_cpu_pct": 100 * gen_share,
            "generator_bound": gen_share >= GENERATOR_BOUND,
            "seconds": self.wall,
        }
        if self.extra:
            result[f"server_cpu_us_per_{unit}_by_process"] = [p / count * 1e6 for p in self.parts]
        # How much work one wake-up of each server process did (its context switches).
        result[f"{unit}s_per_switch_by_process"] = [count / max(n, 1) for n in self.switches]
        return result


# --------------------------------------------------------------------------
# Simulated browsers
# --------------------------------------------------------------------------


def client_tls() -> ssl.SSLContext:
    """A TLS client context for the benchmark's self-signed server (no verification)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """Build a final, masked client frame (clients must mask, RFC 6455 5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked


class Hub:
    """State shared by all simulated browsers of one server session.

    ``on_text`` is swapped per scenario so that the per-frame path does only
    what that scenario needs to check.
    """

    def __init__(self, host: str, port: int) -> None:
        """Precompute the handshake and ping bytes every client sends."""
        key = base64.b64encode(os.urandom(16))
        self.handshake = (
            b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
        )
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.ping = mask_frame(0x9, b"r")
        self.on_text: Callable[[WsClient, bytes], None] = self.unexpected
        self.frames = 0
        self.expected = 0
        self.done: asyncio.Future[None] | None = None
        self.errors: list[str] = []
        self.closed = 0
        self.reads = 0  # data_received calls on open connections

    def unexpected(self, client: WsClient, payload: bytes) -> None:
        """Default handler: no frame is expected outside a scenario."""
        self.error(f"unexpected frame for {client.uid}: {payload[:60]!r}")

    def error(self, message: str) -> None:
        """Record a failure and end the running scenario early."""
        if len(self.errors) < 20:
            self.errors.append(message)
        if self.done is not None and not self.done.done():
            self.done.set_exception(BenchError(message))

    def expect(self, frames: int) -> asyncio.Future[None]:
        """Arm a future that completes once ``frames`` more frames arrived."""
        self.frames = 0
        self.expected = frames
        self.done = asyncio.get_running_loop().create_future()
        if frames == 0:
            self.done.set_result(None)
        return self.done

    def count(self) -> None:
        """Count one frame toward the armed expectation."""
        self.frames += 1
        if self.frames == self.expected and self.done is not None and not self.done.done():
            self.done.set_result(None)


class WsClient(asyncio.Protocol):
    """One simulated browser: handshake, uid frame, then receive frames.

    ``ready`` resolves when the pong to a ping sent right after the uid frame
    arrives: frames on a connection are handled in order, so by then the
    server has processed the uid (registration is observable without any
    extension of the protocol).
    """

    __slots__ = (
        "uid",
        "hub",
        "transport",
        "buf",
        "is_open",
        "ready",
        "received",
        "checksum",
        "parts",
    )

    def __init__(self, uid: str, hub: Hub, ready: asyncio.Future[None]) -> None:
        """A browser that will announce ``uid``; ``ready`` resolves once registered."""
        self.uid = uid
        self.hub = hub
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.is_open = False
        self.received = 0
        self.checksum = 0
        self.parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake right away."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport.write(self.hub.handshake)

    def connection_lost(self, exc: Exception | None) -> None:
        """A connection lost before it was ready fails the set-up."""
        self.hub.closed += 1
        if not self.ready.done():
            self.ready.set_exception(
                BenchError(f"{self.uid}: connection lost during setup ({exc})")
            )

    def data_received(self, data: bytes) -> None:
        """Check the 101 response first, then parse frames."""
        if self.is_open:
            self.hub.reads += 1
            self.parse(self.buf + data if self.buf else data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self.buf[:end], self.buf[end + 4 :]
        self.buf = b""
        if not head.startswith(b"HTTP/1.1 101") or self.hub.accept not in head:
            self.fail(f"bad handshake response: {head[:80]!r}")
            return
        self.is_open = True
        assert self.transport is not None
        self.transport.write(mask_frame(0x1, self.uid.encode()) + self.hub.ping)
        if rest:
            self.parse(rest)

    def fail(self, message: str) -> None:
        """Abort this connection and report why."""
        if not self.ready.done():
            self.ready.set_exception(BenchError(f"{self.uid}: {message}"))
        self.hub.error(f"{self.uid}: {message}")
        if self.transport is not None:
            self.transport.abort()

    def parse(self, buf: bytes) -> None:
        """Consume every complete server frame in ``buf``; keep the remainder."""
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            length, head = b2 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b2 & 0x80:
                self.fail("server frame is masked")
                return
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = b1 & 0x0F
            if not b1 & 0x80:  # fragment: keep until the final one
                self.parts.append(payload)
                continue
            if opcode == 0x0:  # final continuation
                payload = b"".join(self.parts) + payload
                self.parts.clear()
                opcode = 0x1
            if opcode == 0x1 or opcode == 0x2:
                self.hub.on_text(self, payload)
            elif opcode == 0xA:
                if not self.ready.done():
                    self.ready.set_result(None)
            elif opcode == 0x9:
                assert self.transport is not None
                self.transport.write(mask_frame(0xA, payload))
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
                break
        self.buf = buf[pos:]


async def connect_clients(
    hub: Hub,
    host: str,
    port: int,
    uids: list[str],
    window: int,
    tls: ssl.SSLContext | None = None,
) -> list[WsClient]:
    """Open one connection per uid, at most ``window`` set-ups in flight.

    The window keeps the server's accept queue short (Twisted listens with a
    backlog of 50): an overflowing backlog would measure SYN retransmission
    timers instead of the server.
    """
    loop = asyncio.get_running_loop()
    clients: list[WsClient] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(uids):
            uid = uids[next_index]
            next_index += 1
            ready = loop.create_future()
            client = WsClient(uid, hub, ready)
            await loop.create_connection(lambda c=client: c, host, port, ssl=tls)
            clients.append(client)
            await ready

    await asyncio.gather(*(worker() for _ in range(min(window, len(uids)))))
    return clients


def close_clients(clients: list[WsClient]) -> None:
    """Drop all connections at once (teardown is not measured)."""
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


# --------------------------------------------------------------------------
# Backend connections on the backend port
# --------------------------------------------------------------------------


class Backend(asyncio.Protocol):
    """A backend connection that pipelines request lines and counts replies.

    ``submit`` queues lines and keeps at most ``window`` of them unanswered,
    so that neither side buffers unbounded amounts; ``write_now`` bypasses the
    queue for paced traffic.
    """

    def __init__(self) -> None:
        """Idle until ``submit`` or ``write_now``."""
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.replies: Counter[bytes] = Counter()
        self.replied = 0
        self.sent = 0
        self.queue: list[bytes] = []
        self.queued = 0
        self.window = 1
        self.target = 0
        self.done: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport for writing requests."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        """A lost backend connection fails the batch in flight."""
        if self.done is not None and not self.done.done():
            self.done.set_exception(BenchError(f"backend connection lost ({exc})"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Count reply lines and top up the pipeline."""
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        self.replies.update(lines)
        self.replied += len(lines)
        if self.queued < len(self.queue) and self.sent - self.replied <= self.window // 2:
            self.fill()
        if self.replied >= self.target and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def fill(self) -> None:
        """Write queued lines until ``window`` requests are unanswered."""
        room = self.window - (self.sent - self.replied)
        chunk = self.queue[self.queued : self.queued + room]
        self.queued += len(chunk)
        self.sent += len(chunk)
        assert self.transport is not None
        self.transport.write(b"".join(chunk))

    def submit(self, lines: list[bytes], window: int) -> asyncio.Future[None]:
        """Send ``lines`` pipelined; the future completes with the last reply."""
        self.queue, self.queued, self.window = lines, 0, window
        self.reset(len(lines))
        self.fill()
        assert self.done is not None
        return self.done

    def reset(self, expected: int) -> None:
        """Start counting a new batch of ``expected`` replies."""
        self.replies.clear()
        self.replied = self.sent = 0
        self.target = expected
        self.done = asyncio.get_running_loop().create_future()
        if expected == 0:
            self.done.set_result(None)

    def write_now(self, data: bytes, lines: int) -> None:
        """Send ``lines`` request lines immediately (paced traffic)."""
        self.sent += lines
        assert self.transport is not None
        self.transport.write(data)


async def open_backends(host: str, port: int | tuple[int, ...], count: int) -> list[Backend]:
    """Open ``count`` backend connections to the backend port (round robin over several)."""
    loop = asyncio.get_running_loop()
    ports = port if isinstance(port, tuple) else (port,)
    backends = []
    for i in range(count):
        _, proto = await loop.create_connection(Backend, host, ports[i % len(ports)])
        backends.append(proto)
    return backends


def close_backends(backends: list[Backend]) -> None:
    """Close backend connections politely (the server sees a clean EOF)."""
    for backend in backends:
        if backend.transport is not None:
            backend.transport.close()


def check_replies(backends: list[Backend], expected: bytes, total: int) -> None:
    """Every reply line must be ``expected``; raise with a sample otherwise."""
    replies: Counter[bytes] = Counter()
    for backend in backends:
        replies.update(backend.replies)
    if replies[expected] != total:
        sample = {k.decode(errors="replace"): v for k, v in replies.most_common(3)}
        raise BenchError(f"expected {total} x {expected.decode()!r}, got {sample}")


def push_line(uid: str, text: str, key: str = "data") -> bytes:
    """Encode one push request line."""
    return json.dumps({"uid": uid, key: text}, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


@dataclass
class Target:
    """Where the server listens and which processes to watch.

    A cluster adds the other processes whose CPU counts (``extra_pids``: the
    other nodes, Redis) and may spread backends over several backend ports
    (``backend_ports``).
    """

    host: str
    ws_port: int
    text_port: int
    pid: int
    extra_pids: tuple[int, ...] = ()
    backend_ports: tuple[int, ...] = ()
    tls: ssl.SSLContext | None = None  # clients speak wss:// (the certificate is not checked)

    def window(self) -> Window:
        """A measuring window over every process of this target."""
        return Window(self.pid, self.extra_pids)

    @property
    def backend_port(self) -> int | tuple[int, ...]:
        """Where backend connections go."""
        return self.backend_ports or self.text_port


@dataclass
class Config:
    """Sizes of one run; ``quick`` shrinks them to fit a regression check."""

    clients: int = 1000
    fanout_clients: int = 10000
    max_clients: int = 0
    unicast_pushes: int = 50000
    offline_pushes: int = 50000
    broadcasts: int = 10
    min_seconds: float = 1.0
    latency_rate: int = 2000
    latency_seconds: float = 5.0
    connect_window: int = 48
    pipeline_window: int = 1000
    timeout: float = 120.0


async def scenario_connect(
    target: Target, hub: Hub, n: int, cfg: Config, prefix: str = "u"
) -> tuple[dict[str, Any], list[WsClient]]:
    """Connect ``n`` browsers; connections/s, server CPU and RSS per connection."""
    rss_before = proc_rss_kib(target.pid)
    uids = [f"{prefix}{i}" for i in range(n)]
    window = target.window()
    window.start()
    clients = await asyncio.wait_for(
        connect_clients(hub, target.host, target.ws_port, uids, cfg.connect_window, target.tls),
        cfg.timeout,
    )
    window.stop()
    await asyncio.sleep(0.2)  # let allocations settle before reading RSS
    rss_after = proc_rss_kib(target.pid)
    result = window.figures(n, "conn")
    result["rss_kib_per_conn"] = (rss_after - rss_before) / n
    result["rss_mib_total"] = rss_after / 1024
    if hub.errors:
        raise BenchError(hub.errors[0])
    return result, clients


async def scenario_unicast(
    target: Target,
    hub: Hub,
    clients: list[WsClient],
    backends_n: int,
    cfg: Config,
    loss_wait: float = 0.0,
) -> dict[str, Any]:
    """Pipeline unicast pushes over ``backends_n`` backend connections.

    Push ``j`` of a batch goes to client ``j mod N`` with payload ``j``; each
    client counts and sums what it receives, so a lost, duplicated or
    misrouted frame is caught.  Batches repeat until ``cfg.min_seconds``.

    With ``loss_wait`` > 0 (a cluster), frames still missing that long after
    the last reply are counted as lost (``lost``) instead of failing the run:
    a node drops messages that reach it after their deadline, even when the
    backend was already told ``ok``.
    """
    n, pushes = len(clients), cfg.unicast_pushes
    expected_sum = [0] * n
    expected_count = [0] * n
    per_backend: list[list[bytes]] = [[] for _ in range(backends_n)]
    for j in range(pushes):
        i = j % n
        expected_sum[i] += j
        expected_count[i] += 1
        line = push_line(clients[i].uid, str(j), key="percent")
        per_backend[j % backends_n].append(line)

    def on_text(client: WsClient, payload: bytes) -> None:
        client.received += 1
        client.checksum += int(payload)
        hub.count()

    hub.on_text = on_text
    backends = await open_backends(target.host, target.backend_port, backends_n)
    window = target.window()
    batches = lost = 0
    hub.reads = 0
    window.start()
    while batches == 0 or time.perf_counter() - window.t0 < cfg.min_seconds:
        for client in clients:
            client.received = client.checksum = 0
        frames_done = hub.expect(pushes)
        replies = [
            b.submit(lines, cfg.pipeline_window)
            for b, lines in zip(backends, per_backend, strict=True)
        ]
        if loss_wait:
            await asyncio.wait_for(asyncio.gather(*replies), cfg.timeout)
            check_replies(backends, b"ok", pushes)
            try:
                await asyncio.wait_for(asyncio.shield(frames_done), loss_wait)
            except asyncio.TimeoutError:
                lost += pushes - hub.frames
            batches += 1
            continue
        try:
            await asyncio.wait_for(asyncio.gather(frames_done, *replies), cfg.timeout)
        except asyncio.TimeoutError:
            raise BenchError(
                f"timeout: {hub.frames} of {pushes} frames arrived, replies"
                f" {sum((b.replies for b in backends), Counter[bytes]()).most_common(3)}"
            ) from None
        check_replies(backends, b"ok", pushes)
        for i, client in enumerate(clients):
            if client.received != expected_count[i] or client.checksum != expected_sum[i]:
                raise BenchError(
                    f"{client.uid}: got {client.received} frames, expected {expected_count[i]}"
                )
        batches += 1
    window.stop()
    hub.on_text = hub.unexpected
    close_backends(backends)
    result = window.figures(pushes * batches, "push")
    result["frames_per_read"] = pushes * batches / max(hub.reads, 1)
    result["lost"] = lost
    result["lost_pct"] = 100 * lost / (pushes * batches)
    return result


async def scenario_offline(target: Target, hub: Hub, cfg: Config) -> dict[str, Any]:
    """Pushes to uids nobody holds: every reply must be ``fail``."""
    pushes = cfg.offline_pushes
    lines = [push_line(f"offline{j}", str(j)) for j in range(pushes)]
    backends = await open_backends(target.host, target.backend_port, 1)
    window = target.window()
    batches = 0
    window.start()
    while batches == 0 or time.perf_counter() - window.t0 < cfg.min_seconds:
        await asyncio.wait_for(backends[0].submit(lines, cfg.pipeline_window), cfg.timeout)
        check_replies(backends, b"fail", pushes)
        batches += 1
    window.stop()
    if hub.errors:
        raise BenchError(hub.errors[0])
    close_backends(backends)
    return window.figures(pushes * batches, "push")


async def scenario_latency(
    target: Target, hub: Hub, clients: list[WsClient], cfg: Config
) -> dict[str, Any]:
    """Push at a fixed rate; latency from the send timestamp in each payload."""
    rate, total = cfg.latency_rate, int(cfg.latency_rate * cfg.latency_seconds)
    latencies: list[int] = []
    clock = time.perf_counter_ns

    def on_text(client: WsClient, payload: bytes) -> None:
        latencies.append(clock() - int(payload))
        hub.count()

    hub.on_text = on_text
    uids = [c.uid for c in clients]
    prefixes = [b'{"uid":%s,"data":"' % json.dumps(u).encode() for u in uids]
    (backend,) = await open_backends(target.host, target.backend_port, 1)
    backend.reset(total)
    frames_done = hub.expect(total)
    window = target.window()
    window.start()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        batch = []
        while sent < due:
            batch.append(b'%s%d"}\n' % (prefixes[sent % len(prefixes)], clock()))
            sent += 1
        backend.write_now(b"".join(batch), len(batch))
        # Ticks of at least 1 ms: event loops round shorter timers to a busy spin.
        await asyncio.sleep(max(0.001, t0 + sent / rate - time.perf_counter()))
    send_seconds = time.perf_counter() - t0
    assert backend.done is not None
    await asyncio.wait_for(asyncio.gather(frames_done, backend.done), cfg.timeout)
    window.stop()
    hub.on_text = hub.unexpected
    check_replies([backend], b"ok", total)
    assert backend.transport is not None
    backend.transport.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    result = window.figures(total, "push")
    result.update(
        achieved_rate=total / send_seconds,
        p50_ms=q[49] / 1e6,
        p90_ms=q[89] / 1e6,
        p99_ms=q[98] / 1e6,
        max_ms=max(latencies) / 1e6,
    )
    return result


async def scenario_broadcast(
    target: Target, hub: Hub, clients: list[WsClient], cfg: Config
) -> dict[str, Any]:
    """Broadcasts, two in flight, until ``cfg.min_seconds``; frames delivered/s."""
    n, count = len(clients), cfg.broadcasts

    def on_text(client: WsClient, payload: bytes) -> None:
        client.received += 1
        hub.count()

    hub.on_text = on_text
    lines = [b'{"cmd":"broadcast","data":"b%d"}\n' % k for k in range(count)]
    backends = await open_backends(target.host, target.backend_port, 1)
    window = target.window()
    batches = 0
    hub.reads = 0
    window.start()
    while batches == 0 or time.perf_counter() - window.t0 < cfg.min_seconds:
        for client in clients:
            client.received = 0
        frames_done = hub.expect(n * count)
        replies = backends[0].submit(lines, 2)
        await asyncio.wait_for(asyncio.gather(frames_done, replies), cfg.timeout)
        check_replies(backends, b"ok", count)
        short = [c.uid for c in clients if c.received != count]
        if short:
            raise BenchError(f"{len(short)} clients missed broadcasts, e.g. {short[0]}")
        batches += 1
    window.stop()
    hub.on_text = hub.unexpected
    close_backends(backends)
    result = window.figures(n * count * batches, "frame")
    result["frames_per_read"] = n * count * batches / max(hub.reads, 1)
    return result


# TcpExt counters that tell whether the kernel dropped or delayed handshakes.
LISTEN_COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
    "TCPSynRetrans",
)


def tcp_counters() -> dict[str, int]:
    """This network namespace's ``LISTEN_COUNTERS`` (``/proc/net/netstat``); {} if unreadable."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
            return {k: table[k] for k in LISTEN_COUNTERS if k in table}
    return {}


async def scenario_burst(target: Target, hub: Hub, n: int, cfg: Config) -> dict[str, Any]:
    """Open ``n`` connections at once (no in-flight cap): does the listen backlog hold?

    All ``n`` connect() calls are issued in one loop turn.  Per connection it
    records the time until TCP connected and until registered (the pong after
    the uid); a SYN or handshake ACK dropped by an overflowing accept queue
    shows up as a wait of ≥ 1 s (the initial retransmission timeout) and in
    the kernel's TcpExt counters, read before and after.
    """
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    before = tcp_counters()
    connected: list[float] = []
    registered: list[float] = []
    clients: list[WsClient] = []

    async def one(i: int) -> None:
        ready = loop.create_future()
        client = WsClient(f"burst{i}", hub, ready)
        t0 = clock()
        await loop.create_connection(lambda: client, target.host, target.ws_port)
        connected.append(clock() - t0)
        clients.append(client)
        await ready
        registered.append(clock() - t0)

    window = target.window()
    window.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), cfg.timeout)
    finally:
        window.stop()
        close_clients(clients)
    after = tcp_counters()
    q = statistics.quantiles(registered, n=100, method="inclusive")
    result = window.figures(n, "conn")
    result.update(
        connect_over_1s=sum(t >= 1.0 for t in connected),
        registered_over_1s=sum(t >= 1.0 for t in registered),
        connect_max_ms=max(connected) * 1e3,
        registered_p50_ms=q[49] * 1e3,
        registered_p99_ms=q[98] * 1e3,
        registered_max_ms=max(registered) * 1e3,
        tcp_counters={k: after[k] - before[k] for k in after if k in before},
    )
    return result


class RecordingBackend(Backend):
    """A backend connection that keeps every reply line in order."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        """Keep the complete lines, then count them as usual."""
        self.lines += (self.buf + data).split(b"\n")[:-1]
        super().data_received(data)


# push.js's reconnect: a random wait in [0, min(cap, base * 2^attempt)) ms ("full jitter").
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0


async def reconnect_like_push_js(
    target: Target, hub: Hub, uid: str, clients: list[WsClient], registered: list[float]
) -> None:
    """One browser after a drop: push.js's jittered backoff until it is registered again."""
    loop = asyncio.get_running_loop()
    for attempt in range(12):  # bounded: 12 attempts reach the 30 s cap
        await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
        ready = loop.create_future()
        client = WsClient(uid, hub, ready)
        try:
            await loop.create_connection(lambda c=client: c, target.host, target.ws_port)
            await asyncio.wait_for(ready, 10)
        except (OSError, BenchError, asyncio.TimeoutError):
            if client.transport is not None:
                client.transport.abort()
            continue
        clients.append(client)
        registered.append(time.perf_counter())
        return
    raise BenchError(f"{uid} did not get back within 12 attempts")


async def scenario_storm(target: Target, n: int, rate: int, cfg: Config) -> dict[str, Any]:
    """``n`` connected browsers dropped at once reconnect with push.js's backoff, under pushes.

    A backend pushes ``rate`` pushes/s to random uids throughout (payload: a
    sequence number).  A push answered ``ok`` must reach its uid's connection
    (checked 2 s after the storm): a reply of ``ok`` for a browser still away
    is a lie, ``fail`` is the honest answer.
    """
    hub = Hub(target.host, target.ws_port)
    got: set[int] = set()
    hub.on_text = lambda client, payload: got.add(int(payload))
    uids = [f"s{i}" for i in range(n)]
    clients = await connect_clients(hub, target.host, target.ws_port, uids, cfg.connect_window)
    hub.errors.clear()  # drops below are expected; failures are counted per attempt
    loop = asyncio.get_running_loop()
    _, backend = await loop.create_connection(RecordingBackend, target.host, target.text_port)
    backend.reset(0)
    sent: list[int] = []  # sequence numbers, in order; replies come back in the same order
    stop = asyncio.Event()

    async def pushes() -> None:
        seq = 0
        while not stop.is_set():
            lines = []
            for _ in range(max(1, rate // 100)):
                lines.append(push_line(random.choice(uids), str(seq)))
                sent.append(seq)
                seq += 1
            backend.write_now(b"".join(lines), len(lines))
            await asyncio.sleep(0.01)

    pusher = asyncio.ensure_future(pushes())
    await asyncio.sleep(0.5)
    window = target.window()
    back: list[WsClient] = []
    registered: list[float] = []
    window.start()
    t0 = time.perf_counter()
    close_clients(clients)
    await asyncio.wait_for(
        asyncio.gather(*(reconnect_like_push_js(target, hub, u, back, registered) for u in uids)),
        cfg.timeout,
    )
    window.stop()
    await asyncio.sleep(0.5)
    stop.set()
    await pusher
    while backend.replied < len(sent):
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # frames still in flight
    lies = sum(r == b"ok" and seq not in got for r, seq in zip(backend.lines, sent, strict=True))
    close_clients(back)
    close_backends([backend])
    result = window.figures(n, "conn")
    q = statistics.quantiles([t - t0 for t in registered], n=100, method="inclusive")
    result.update(
        all_back_s=max(registered) - t0,
        back_p50_s=q[49],
        back_p99_s=q[98],
        pushes=len(sent),
        pushes_ok=backend.replies[b"ok"],
        pushes_fail=backend.replies[b"fail"],
        ok_not_delivered=lies,
        delivered=len(got),
    )
    return result


def proc_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def scenario_memory_cycles(
    target: Target, n: int, cycles: int, cfg: Config
) -> dict[str, Any]:
    """Connect ``n`` clients, drop them all, ``cycles`` times: RSS after each cycle.

    Clients are dropped with a reset (no TIME_WAIT on either side, so the
    ephemeral ports are free for the next cycle); each cycle waits until the
    server has closed its side (its fd count is back to the start), then 1 s.
    """
    rss = [proc_rss_kib(target.pid)]
    fds0 = proc_fds(target.pid)
    peaks: list[int] = []
    for cycle in range(cycles):
        hub = Hub(target.host, target.ws_port)
        _, clients = await scenario_connect(target, hub, n, cfg, prefix=f"m{cycle}-")
        peaks.append(proc_rss_kib(target.pid))
        close_clients(clients)
        deadline = time.monotonic() + cfg.timeout
        while proc_fds(target.pid) > fds0:
            if time.monotonic() > deadline:
                raise BenchError(f"server still holds {proc_fds(target.pid) - fds0} extra fds")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        rss.append(proc_rss_kib(target.pid))
    return {
        "clients": n,
        "rss_kib_start": rss[0],
        "rss_kib_connected": peaks,
        "rss_kib_after_close": rss[1:],
    }


async def session_unicast(target: Target, cfg: Config) -> dict[str, Any]:
    """Connect ``cfg.clients`` browsers, then the unicast/offline/latency scenarios."""
    hub = Hub(target.host, target.ws_port)
    results: dict[str, Any] = {}
    results[f"connect_{cfg.clients}"], clients = await scenario_connect(
        target, hub, cfg.clients, cfg
    )
    try:
        results["unicast_1"] = await scenario_unicast(target, hub, clients, 1, cfg)
        results["unicast_8"] = await scenario_unicast(target, hub, clients, 8, cfg)
        results["offline"] = await scenario_offline(target, hub, cfg)
        results["latency"] = await scenario_latency(target, hub, clients, cfg)
    finally:
        close_clients(clients)
    return results


async def session_fanout(target: Target, cfg: Config) -> dict[str, Any]:
    """Connect ``cfg.fanout_clients`` browsers, then broadcast to all of them."""
    hub = Hub(target.host, target.ws_port)
    results: dict[str, Any] = {}
    results[f"connect_{cfg.fanout_clients}"], clients = await scenario_connect(
        target, hub, cfg.fanout_clients, cfg
    )
    try:
        results["broadcast"] = await scenario_broadcast(target, hub, clients, cfg)
    finally:
        close_clients(clients)
    return results


async def session_max(target: Target, cfg: Config) -> dict[str, Any]:
    """Connect as many browsers as the file-descriptor limit allows."""
    hub = Hub(target.host, target.ws_port)
    result, clients = await scenario_connect(target, hub, cfg.max_clients, cfg)
    close_clients(clients)
    return {"connect_max": result}


SESSIONS: dict[str, Callable[[Target, Config], Any]] = {
    "unicast": session_unicast,
    "fanout": session_fanout,
    "max": session_max,
}


def main() -> None:
    """Run the sessions once against an already running server; print JSON."""
    parser = argparse.ArgumentParser(description="push protocol load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--text-port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="server process to measure")
    parser.add_argument("--clients", type=int, default=Config.clients)
    parser.add_argument("--fanout-clients", type=int, default=Config.fanout_clients)
    args = parser.parse_args()
    cfg = Config(clients=args.clients, fanout_clients=args.fanout_clients)
    target = Target(args.host, args.ws_port, args.text_port, args.pid)
    results: dict[str, Any] = {}
    for name in ("unicast", "fanout"):
        results.update(asyncio.run(SESSIONS[name](target, cfg)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
