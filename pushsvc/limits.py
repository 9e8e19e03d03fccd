"""Resource limits of the WebSocket side: send queues, client frame rate, connection counts.

Each limit is enforced where it is cheapest: total connections by Autobahn at
the opening handshake, per-IP counts in ``onConnect``, per-uid counts at
authentication, client frames per frame header, and the send queue only
while the transport says it is full (so a push to a healthy connection costs
nothing extra).  docs/security.md lists every limit, its default and what a
client sees when it hits it.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Close codes (docs/protocol.md): 4010 and 4029 are pushsvc's, 1008 is the
# standard "policy violation".
CLOSE_SLOW_CONSUMER = 4010
CLOSE_TOO_MANY_CONNECTIONS = 4029
CLOSE_RATE_LIMITED = 1008

DEFAULT_MAX_QUEUE = 1 << 20
# File descriptors kept free for backend connections, the HTTP port, log
# files and listening sockets when --max-connections is derived from the fd limit.
FD_RESERVE = 100


def default_max_connections(reserve: int = FD_RESERVE) -> int:
    """WebSocket connections the fd limit allows, keeping ``reserve`` descriptors for the rest.

    Refusing with 503 at the handshake is better than running out of
    descriptors: then accept() fails for backends and the HTTP port too.
    0 (no limit) when the fd limit is unlimited.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 0
    return max(1, soft - reserve)


def _discard(data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
    """Swallow a write to a connection that is being closed as a slow consumer."""


@implementer(IPushProducer)
class SendQueueGuard:
    """Closes a connection whose peer does not read what is pushed to it.

    Registered as the connection's streaming producer, so the transport calls
    ``pauseProducing`` once its buffer passes its high-water mark (64 KiB for
    TCP) and ``resumeProducing`` once it has drained.  Only in between does
    the guard count: it shadows the protocol's ``sendData`` with a counting
    version (an instance attribute, removed again on resume), so writes to a
    connection that keeps up cost nothing extra.  Bytes written while paused
    are exactly the bytes the transport holds beyond its high-water mark,
    without reading Twisted's private buffer fields.

    Past ``limit`` bytes, ``on_overflow`` is called once; from then on every
    write is dropped (the caller queues its close frame first).
    """

    __slots__ = ("conn", "limit", "on_overflow", "queued", "paused", "tripped")

    def __init__(self, conn: Any, limit: int, on_overflow: Callable[[], None]) -> None:
        self.conn = conn
        self.limit = limit
        self.on_overflow = on_overflow
        self.queued = 0
        self.paused = False
        self.tripped = False

    def attach(self, transport: Any) -> None:
        """Register on ``transport``, replacing a producer left by a previous owner.

        Under ``WebSocketResource`` the HTTP channel registered itself as the
        transport's producer before handing the transport over; it no longer
        writes to it, and a transport takes one producer only.
        """
        if (
            getattr(transport, "producer", None) is not None
            or getattr(transport, "_producer", None) is not None
        ):
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        # Called on every write while the buffer is over the mark: idempotent.
        if self.paused or self.tripped:
            return
        self.paused = True
        self.queued = 0
        self.conn.sendData = self._send_counted

    def resumeProducing(self) -> None:
        if self.paused and not self.tripped:
            self.paused = False
            self.conn.__dict__.pop("sendData", None)

    def stopProducing(self) -> None:
        """The connection is gone; nothing to stop (the protocol produces on demand)."""

    def _send_counted(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        self.queued += len(data)
        if self.queued <= self.limit:
            type(self.conn).sendData(self.conn, data, sync, chopsize)
            return
        self.tripped = True
        # Let the caller's close frame through, then drop everything else.
        self.conn.__dict__.pop("sendData", None)
        try:
            self.on_overflow()
        finally:
            self.conn.sendData = _discard


class TokenBucket:
    """``rate`` events a second on average, ``burst`` at once: one per client connection."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when there is none left."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


def peer_ip(peer: str | None) -> str:
    """The address part of an Autobahn peer string, as the key for per-IP counting.

    ``tcp4:1.2.3.4:5555`` and ``tcp6:::1:5555`` give the host; a peer that
    came from a trusted ``X-Forwarded-For`` header is the bare address as the
    proxy wrote it (truncated: it is client-controlled text up to the proxy).
    """
    if not peer:
        return "?"
    for prefix in ("tcp4:", "tcp6:"):
        if peer.startswith(prefix):
            return peer[len(prefix) :].rsplit(":", 1)[0]
    if peer.startswith("unix"):
        return "unix"
    return peer[:64]


class PerKeyCounter:
    """Live connections per key (an IP address), refusing past ``limit`` (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Count one more connection for ``key``; False (and not counted) when at the limit."""
        count = self._counts.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)
