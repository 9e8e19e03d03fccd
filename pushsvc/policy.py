"""What clients may do: origins, connection counts, frame rates, send queues, failed credentials.

Each limit is enforced where it is cheapest: total and per-IP connections
from accept (before a byte is read; per-IP in ``onConnect`` when the address
comes from X-Forwarded-For), the opening handshake's size as it arrives and
its deadline in one sweep, per-uid counts at
authentication, client frames per frame header, and the send queue only
while the transport says it is full (so a push to a healthy connection costs
nothing extra).  Failed backend secrets and API keys are counted per IP: past
a limit the IP is refused for a while.  docs/security.md lists every limit,
its default and what a client sees when it hits it.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from pushsvc.ratelog import RateLimitedLog

log = Logger()

DEFAULT_MAX_QUEUE = 1 << 20
# File descriptors kept free for backend connections, the HTTP port, log
# files and listening sockets when --max-connections is derived from the fd limit.
FD_RESERVE = 100
# The opening handshake (request line and headers): at most this many bytes
# (as Go's and nginx's defaults bound theirs), within this many seconds of accept.
DEFAULT_MAX_HANDSHAKE = 16 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 5.0


def default_max_connections(reserve: int = FD_RESERVE) -> int:
    """WebSocket connections the fd limit allows, keeping ``reserve`` descriptors for the rest.

    Refusing WebSocket sockets at accept (counted from accept, half-open ones
    included) is better than running out of descriptors: then accept() fails
    for backends and the HTTP port too.
    0 (no limit) when the fd limit is unlimited.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 0
    return max(1, soft - reserve)


@implementer(IPushProducer)
class SendQueueGuard:
    """Closes a connection whose peer does not read what is pushed to it.

    Registered as the connection's streaming producer, so the transport calls
    ``pauseProducing`` once its buffer passes its high-water mark (64 KiB for
    TCP) and ``resumeProducing`` once it has drained.  Only in between does
    the connection count its writes through :meth:`admit` (so writes to a
    connection that keeps up cost nothing extra).  Bytes written while paused
    are exactly the bytes the transport holds beyond its high-water mark,
    without reading Twisted's private buffer fields.

    Past ``limit`` bytes, ``on_overflow`` is called once; the writes it makes
    (its close frame) go through, every later one is dropped.
    """

    __slots__ = ("limit", "on_overflow", "queued", "state")

    OPEN, PAUSED, CLOSING, DROPPING = range(4)

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.queued = 0
        self.state = self.OPEN

    def pauseProducing(self) -> None:
        # Called on every write while the buffer is over the mark: idempotent.
        if self.state == self.OPEN:
            self.state = self.PAUSED
            self.queued = 0

    def resumeProducing(self) -> None:
        if self.state == self.PAUSED:
            self.state = self.OPEN

    def stopProducing(self) -> None:
        """The connection is gone; nothing to stop (the protocol produces on demand)."""

    def admit(self, size: int) -> bool:
        """Whether a write of ``size`` bytes may go out (only asked while not OPEN)."""
        state = self.state
        if state == self.PAUSED:
            self.queued += size
            if self.queued <= self.limit:
                return True
            self.state = self.CLOSING
            try:
                self.on_overflow()
            finally:
                self.state = self.DROPPING
            return False
        return state == self.CLOSING or state == self.OPEN


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
        if not self.would_admit(key):
            return False
        self._counts[key] = self._counts.get(key, 0) + 1
        return True

    def would_admit(self, key: str) -> bool:
        """Whether :meth:`acquire` would count ``key`` now."""
        return not self.limit or self._counts.get(key, 0) < self.limit

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)


class ConnectionCaps:
    """``--max-connections`` and ``--max-per-ip``, counted from the moment a socket is accepted.

    A socket still sending its opening handshake holds a descriptor like an
    open WebSocket, so it counts like one (as HAProxy counts per source from
    accept): half-open sockets cannot push the count past the caps.  A
    refused socket is never counted, so one address over its own share
    takes nothing from the total other addresses can use.  ``per_ip`` is 0
    (not counted) when the client address is only known from the headers
    (``--trust-x-forwarded-for``): then only the total is counted here.
    """

    TOO_MANY = "too_many_connections"
    TOO_MANY_FROM_IP = "too_many_from_ip"
    STATUS = {TOO_MANY: 503, TOO_MANY_FROM_IP: 429}

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.count = 0
        self.per_ip = PerKeyCounter(per_ip) if per_ip else None

    def refusal(self, ip: str) -> str | None:
        """Why a socket from ``ip`` would be refused now (None: it would be admitted)."""
        if self.total and self.count >= self.total:
            return self.TOO_MANY
        if self.per_ip is not None and not self.per_ip.would_admit(ip):
            return self.TOO_MANY_FROM_IP
        return None

    def acquire(self, ip: str) -> str | None:
        """Count a socket from ``ip``; the reason it is refused instead (then not counted)."""
        if self.total and self.count >= self.total:
            return self.TOO_MANY
        per_ip = self.per_ip
        if per_ip is not None and not per_ip.acquire(ip):  # counted there unless refused
            return self.TOO_MANY_FROM_IP
        self.count += 1
        return None

    def release(self, ip: str) -> None:
        """A socket counted by :meth:`acquire` is gone (or handed on)."""
        self.count -= 1
        if self.per_ip is not None:
            self.per_ip.release(ip)


class Deadlines:
    """Sockets that must finish something (their opening handshake) by a deadline, in one sweep.

    Entries are kept in the order they were added, which is the order of
    their deadlines, so a sweep stops at the first one still in time: one
    timer for all sockets instead of one per socket, and O(expired) work.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._since: dict[Any, float] = {}

    def __len__(self) -> int:
        return len(self._since)

    def add(self, conn: Any) -> None:
        """Start (or restart) ``conn``'s deadline now."""
        self._since.pop(conn, None)
        self._since[conn] = self._clock()

    def discard(self, conn: Any) -> None:
        """``conn`` finished in time, or is gone."""
        self._since.pop(conn, None)

    def expired(self) -> list[Any]:
        """Remove and return every entry past its deadline, oldest first."""
        limit = self._clock() - self.timeout
        late = []
        for conn, since in self._since.items():
            if since > limit:
                break
            late.append(conn)
        for conn in late:
            del self._since[conn]
        return late


# -- origins -------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, lower-cased with the default port filled in."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, 0)


class OriginPolicy:
    """Which browser origins may open a WebSocket.

    Entries are exact origins (``https://app.example.com``, a port if not the
    default) or one leading wildcard label (``https://*.example.com``: any
    subdomain, not ``example.com`` itself, same scheme and port).  ``null``
    allows the opaque origin of sandboxed iframes and ``file:`` pages.

    A request without an ``Origin`` header is allowed: browsers always send
    one, so only non-browser clients omit it, and those could send any value.
    """

    def __init__(self, entries: list[str] | None) -> None:
        self.everyone = not entries
        self.null = False
        self._exact: set[tuple[str, str, int]] = set()
        self._suffixes: set[tuple[str, str, int]] = set()
        for entry in entries or ():
            entry = entry.strip()
            if entry == "*":
                self.everyone = True
            elif entry == "null":
                self.null = True
            elif "://*." in entry:
                key = _origin_key(entry.replace("://*.", "://", 1))
                if key is None or "*" in key[1]:
                    raise ValueError(f"not an origin pattern: {entry!r}")
                self._suffixes.add((key[0], "." + key[1], key[2]))
            else:
                key = _origin_key(entry)
                if key is None or "*" in entry:
                    raise ValueError(f"not an origin: {entry!r} (use scheme://host[:port])")
                self._exact.add(key)

    @classmethod
    def parse(cls, value: str | None) -> OriginPolicy:
        """From ``--allowed-origins``: comma-separated entries; empty or None allows all."""
        entries = [e for e in (value or "").split(",") if e.strip()]
        return cls(entries)

    def allows(self, origin: str | None) -> bool:
        if self.everyone or not origin:
            return True
        if origin.strip() == "null":
            return self.null
        key = _origin_key(origin)
        if key is None:
            return False
        if key in self._exact:
            return True
        scheme, host, port = key
        return any(
            s == scheme and p == port and host.endswith(suffix) and len(host) > len(suffix)
            for s, suffix, p in self._suffixes
        )


# -- failed credentials -----------------------------------------------------------


@dataclass
class _Failures:
    window_start: float
    count: int = 0
    blocked_until: float = 0.0


class FailureThrottle:
    """Counts failed credentials per IP; ``limit`` failures within ``window`` s block the IP.

    A blocked IP is refused for ``window`` seconds from its last counted
    failure.  Logged: one line per kind of failure (and one per block) a
    minute, whatever the number of IPs; never every attempt.  The table is
    pruned so that a scan from many addresses cannot grow it without bound.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Any = reactor) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._ips: dict[str, _Failures] = {}
        self._log = RateLimitedLog(log, window, clock=clock.seconds, level=LogLevel.warn)

    def blocked(self, ip: str) -> bool:
        entry = self._ips.get(ip)
        return entry is not None and entry.blocked_until > self._clock.seconds()

    def retry_after(self, ip: str) -> int:
        """Whole seconds until ``ip`` is no longer blocked (at least 1)."""
        entry = self._ips.get(ip)
        if entry is None:
            return 1
        return max(1, int(entry.blocked_until - self._clock.seconds() + 0.999))

    def failed(self, ip: str, what: str) -> None:
        """Count a failure from ``ip``; ``what`` says where (it starts the log line)."""
        now = self._clock.seconds()
        entry = self._entry(ip, now, what)
        entry.count += 1
        if self.limit and entry.count >= self.limit:
            if entry.blocked_until <= now:
                self._log.emit(
                    "blocked",
                    "{count} failed authentication attempts from {ip} within {window:.0f} s: "
                    "refusing it for {window:.0f} s ({suppressed} more addresses were "
                    "blocked since the last such line)",
                    count=entry.count,
                    ip=ip,
                    window=self.window,
                )
            entry.blocked_until = now + self.window

    def note(self, ip: str, what: str) -> None:
        """Log a refusal that tried no credential (not counted towards a block)."""
        self._entry(ip, self._clock.seconds(), what)

    def _entry(self, ip: str, now: float, what: str) -> _Failures:
        """The IP's record for the current window; logs ``what`` once per window."""
        entry = self._ips.get(ip)
        if entry is None:
            if len(self._ips) >= self.MAX_ENTRIES:
                self._prune(now)
            entry = self._ips[ip] = _Failures(now)
        elif now - entry.window_start >= self.window and entry.blocked_until <= now:
            entry.window_start, entry.count = now, 0
        self._log.emit(
            what,
            "{what} from {ip} ({suppressed} more since the last such line; the next "
            "{window:.0f} s are counted, not logged)",
            what=what,
            ip=ip,
            window=self.window,
        )
        return entry

    def _prune(self, now: float) -> None:
        stale = [
            ip
            for ip, e in self._ips.items()
            if e.blocked_until <= now and now - e.window_start >= self.window
        ]
        for ip in stale:
            del self._ips[ip]
        if len(self._ips) >= self.MAX_ENTRIES:  # all live: forget the oldest half
            oldest = sorted(self._ips, key=lambda ip: self._ips[ip].window_start)
            for ip in oldest[: len(oldest) // 2]:
                del self._ips[ip]
