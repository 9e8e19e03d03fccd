"""Who may talk to pushsvc: allowed origins, the backend secret, failed-credential throttling.

The WebSocket side checks the ``Origin`` of browsers; the backend line port
may require a shared secret on its first line; the HTTP API has its key
(http.py).  Failed backend credentials are counted per IP: past a limit the
IP is refused for a while, and the log gets one line per IP per window
instead of one per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from twisted.internet import reactor
from twisted.logger import Logger

from pushsvc import jsoncodec
from pushsvc.auth import Secrets
from pushsvc.commands import request_id

BACKEND_SECRET_ENV = "PUSHSVC_BACKEND_SECRET"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

log = Logger()


# -- origins -------------------------------------------------------------------


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


# -- failed credentials --------------------------------------------------------


@dataclass
class _Failures:
    window_start: float
    count: int = 0
    blocked_until: float = 0.0
    logged: bool = False


class FailureThrottle:
    """Counts failed credentials per IP; ``limit`` failures within ``window`` s block the IP.

    A blocked IP is refused for ``window`` seconds from its last counted
    failure.  Logged: the first failure of an IP in a window, and the block;
    never every attempt.  The table is pruned so that a scan from many
    addresses cannot grow it without bound.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Any = reactor) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._ips: dict[str, _Failures] = {}

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
                log.warn(
                    "{count} failed authentication attempts from {ip} within {window:.0f} s: "
                    "refusing it for {window:.0f} s",
                    count=entry.count,
                    ip=ip,
                    window=self.window,
                )
            entry.blocked_until = now + self.window

    def note(self, ip: str, what: str) -> None:
        """Log a refusal that tried no credential (not counted towards a block)."""
        self._entry(ip, self._clock.seconds(), what)

    def _entry(self, ip: str, now: float, what: str) -> _Failures:
        """The IP's record for the current window; logs ``what`` once per IP per window."""
        entry = self._ips.get(ip)
        if entry is None:
            if len(self._ips) >= self.MAX_ENTRIES:
                self._prune(now)
            entry = self._ips[ip] = _Failures(now)
        elif now - entry.window_start >= self.window and entry.blocked_until <= now:
            entry.window_start, entry.count, entry.logged = now, 0, False
        if not entry.logged:
            entry.logged = True
            log.warn(
                "{what} from {ip} (further failures from it are counted, not logged, "
                "for {window:.0f} s)",
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


# -- the backend line port's secret ------------------------------------------------


def is_auth_request(request: object) -> bool:
    return isinstance(request, dict) and request.get("cmd") == "auth"


def _reply(ok: bool, rid: Any, error: str = "") -> bytes:
    if rid is not None:
        body: dict[str, Any] = {"id": rid, "ok": ok}
        if not ok:
            body["error"] = error
        return jsoncodec.dumps(body) + b"\n"
    return b"ok\n" if ok else b"error " + error.encode() + b"\n"


class BackendGate:
    """The backend port's optional shared secret and its failure throttle.

    With a secret, a connection's first line must be
    ``{"cmd":"auth","secret":"..."}``; until then the protocol's
    ``lineReceived`` is shadowed by :meth:`_first_line` (an instance
    attribute, removed on success, so authenticated lines cost nothing extra).
    Anything else is answered with one error line and the connection is
    closed after it: a peer that does not know the secret gains nothing by
    staying, and a backend missing its auth line fails loudly.
    """

    def __init__(self, secret: Secrets | None, throttle: FailureThrottle | None = None) -> None:
        self.secret = secret
        self.throttle = throttle

    def connection_made(self, proto: Any) -> bool:
        """Set up a new backend connection; False if it was refused (blocked IP)."""
        if self.secret is None:
            return True
        ip = getattr(proto.transport.getPeer(), "host", "?")
        if self.throttle is not None and self.throttle.blocked(ip):
            proto.transport.write(b"error too many failed authentication attempts\n")
            proto.transport.loseConnection()
            proto.lineReceived = _ignore
            return False
        proto.lineReceived = lambda line: self._first_line(proto, ip, line)
        return True

    def _first_line(self, proto: Any, ip: str, line: bytes) -> bytes:
        try:
            request = jsoncodec.loads(line.rstrip(b"\r"))
        except orjson.JSONDecodeError:
            request = None
        rid = request_id(request)
        if not is_auth_request(request):
            self._refuse(proto, ip, "backend connection sent a request before authenticating")
            return _reply(False, rid, "authentication required")
        if not self.check(request):
            if self.throttle is not None:
                self.throttle.failed(ip, "backend authentication failed (wrong secret)")
            self._refuse(proto, ip, None)
            return _reply(False, rid, "authentication failed")
        del proto.lineReceived  # authenticated: back to the class's own method
        return _reply(True, rid)

    def _refuse(self, proto: Any, ip: str, what: str | None) -> None:
        if what is not None and self.throttle is not None:
            # Not counted towards a block (no credential was tried), but logged
            # at most once per IP per window: the symptom of a missing auth line.
            self.throttle.note(ip, what)
        proto.lineReceived = _ignore
        # After this read's replies are written: loseConnection flushes first.
        reactor.callLater(0, proto.transport.loseConnection)

    def check(self, request: dict) -> bool:
        secret = request.get("secret")
        if self.secret is None:
            return True
        if not isinstance(secret, str):
            return False
        return self.secret.matches(secret.encode("utf-8"))


def auth_again(gate: BackendGate | None, request: dict) -> bytes:
    """The reply to an auth line on an open connection (authenticated, or no secret set).

    ``ok`` without a secret configured, so that backends can start sending it
    before the service requires it (roll out the client change first).
    """
    rid = request_id(request)
    if gate is None or gate.check(request):
        return _reply(True, rid)
    return _reply(False, rid, "authentication failed")


def _ignore(line: bytes) -> bytes:
    """Lines after a refusal get no reply: the connection is closing."""
    return b""
