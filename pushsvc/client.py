"""A synchronous Python client for pushsvc's backend port.

Web applications push from request handlers, Celery tasks, cron scripts: code
that is not asynchronous and wants an answer ("was the user online?") before
it goes on.  So this client is blocking and standard-library only, keeps one
TCP connection open between calls (a connect per push would cost more than the
push), and sends a batch of requests in one write so that a thousand pushes
cost one round trip.

    from pushsvc.client import Client

    client = Client("127.0.0.1", 5678)          # or Client(url="tcp://127.0.0.1:5678")
    client.push("uid1", {"task": 7, "percent": 88})   # -> 1 (connections reached), 0 if offline
    client.push_many([("uid1", "a"), ("uid2", "b")])  # one round trip -> [1, 0]
    client.request({"cmd": "stats"})                  # any command -> reply dict

Every request carries an ``id`` (a per-client counter) and every reply's echoed
``id`` is checked, so a reply can never be taken for another request's.

Delivery is at-least-once when the connection breaks: if the connection fails
after a request was written but before its reply was read, the client cannot
know whether pushsvc ran it, and it sends it again on a new connection (once).
A push whose reply was lost may therefore reach the browser twice.  Requests
whose replies were read are never sent again.

A Client may be shared by threads: calls are serialized by a lock (one round
trip at a time).  After ``os.fork()`` the child opens its own connection
instead of using the parent's.  See docs/client.md.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from itertools import count
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "AuthenticationFailed",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Client",
    "ProtocolError",
    "PushConnectionError",
    "PushError",
    "PushTimeout",
    "RequestRejected",
    "parse_address",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5678

Target = str | Sequence[str]
Reply = dict[str, Any]

_MISSING: Any = object()
_RECV_SIZE = 65536
_SHOWN = 60  # bytes of a bad reply quoted in ProtocolError


# -- exceptions -----------------------------------------------------------------


class PushError(Exception):
    """Base class of everything this client raises about pushsvc."""


class PushConnectionError(PushError, ConnectionError):
    """pushsvc could not be reached, or the connection failed, even after a retry.

    ``replies`` holds the replies read before the failure, in request order:
    in a pipeline, the first ``len(replies)`` requests were answered; the rest
    may or may not have been run.
    """

    def __init__(self, message: str, replies: list[Reply] | None = None) -> None:
        super().__init__(message)
        self.replies: list[Reply] = replies or []


class PushTimeout(PushConnectionError, TimeoutError):
    """pushsvc did not answer in time.

    Not retried: the server may still be working on the request, so sending it
    again could run it twice.  The connection is closed (a late reply would
    otherwise be read as the answer to the next request).
    """


class RequestRejected(PushError):
    """pushsvc answered a request with an error (bad field, unknown command...).

    The connection stays usable.  ``reason`` is the server's text, ``request``
    the request as sent, ``reply`` the error reply.  From ``pipeline``,
    ``index`` is the position of the first rejected request and ``replies``
    holds every reply of the batch (the other requests were run).
    """

    def __init__(
        self,
        reason: str,
        request: dict[str, Any] | None = None,
        reply: Reply | None = None,
        *,
        index: int = 0,
        replies: list[Reply] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request = request
        self.reply = reply if reply is not None else {"ok": False, "error": reason}
        self.index = index
        self.replies: list[Reply] = replies if replies is not None else [self.reply]


class AuthenticationFailed(PushError):
    """pushsvc refused the backend secret (or asks for one and none was given).

    Not retried: a new connection would be refused the same way, and wrong
    secrets count toward the service's per-IP block (``--auth-fail-limit``).
    ``reason`` is the server's text.
    """

    def __init__(self, reason: str, address: str) -> None:
        super().__init__(f"pushsvc at {address} refused the backend secret: {reason}")
        self.reason = reason


class ProtocolError(PushError):
    """A reply that does not fit the protocol (not JSON, wrong ``id``).

    Usually the address is not pushsvc's backend port (its HTTP port, say).
    Raised as soon as the first bytes of a reply cannot start one, without
    waiting for a newline that such a peer may never send.  The connection is
    closed, since replies can no longer be matched to requests.
    """


class _Broken(Exception):
    """Internal: the connection failed in a way that a new connection may fix."""


# -- addresses ------------------------------------------------------------------


def parse_address(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``tcp://host:port``, ``host:port``, ``[::1]:port`` or ``host`` into (host, port).

    One function for the ``url`` argument and the CLI's ``PUSHSVC_ADDR``, so
    both accept the same spellings.
    """
    text = value.strip()
    if "://" not in text:
        text = "tcp://" + text
    parts = urlsplit(text)
    if parts.scheme != "tcp":
        raise ValueError(f"unsupported address scheme {parts.scheme!r} in {value!r} (use tcp://)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"unexpected path or query in address {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in address {value!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"missing host in address {value!r}")
    return host, default_port if port is None else port


def _target(value: Target) -> str | list[str]:
    """A uid/group as the protocol wants it: a string, or a list (from any sequence)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("uids and groups are str, not bytes")
    return list(value)


# -- the client -------------------------------------------------------------------


class Client:
    """One kept connection to pushsvc's backend port, opened on first use.

    ``connect_timeout`` bounds each connection attempt; ``timeout`` bounds
    each wait for the server while sending or reading replies (per socket
    operation, not per batch).  ``retries`` is how many times a failed
    connection is re-opened within one call (default once);
    ``retry_delay`` is the pause before re-trying a connection that was
    refused, so that a restarting service has a moment to come back.
    ``secret`` is the backend secret (``--backend-secret-file`` on the
    service): sent as the first line of every connection the client opens.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        url: str | None = None,
        connect_timeout: float = 3.0,
        timeout: float = 5.0,
        retries: int = 1,
        retry_delay: float = 0.2,
        secret: str | None = None,
    ) -> None:
        if url is not None:
            if host is not None or port is not None:
                raise ValueError("give either url or host/port, not both")
            host, port = parse_address(url)
        self.host: str = DEFAULT_HOST if host is None else host
        self.port: int = DEFAULT_PORT if port is None else int(port)
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self._secret = secret
        self._sock: socket.socket | None = None
        self._pid = 0
        self._rbuf = bytearray()
        self._heard = False
        self._ids = count(1)
        self._lock = threading.Lock()
        _clients.add(self)

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "idle"
        return f"<Client tcp://{self.address} {state}>"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- connection -----------------------------------------------------------

    def connect(self) -> None:
        """Open the connection now instead of on the first request (to fail early)."""
        with self._lock:
            if self._usable():
                return
            try:
                self._open()
            except _Broken as e:
                raise PushConnectionError(f"cannot reach pushsvc at {self.address}: {e}") from e

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as e:  # refused, unreachable, DNS failure, connect timeout
            raise _Broken(str(e) or type(e).__name__) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass  # not fatal (and not every socket family has these)
        sock.settimeout(self.timeout)
        self._sock, self._pid = sock, os.getpid()
        self._rbuf.clear()
        self._heard = False  # no byte from the peer yet on this connection
        if self._secret is not None:
            self._authenticate(self._secret)

    def _authenticate(self, secret: str) -> None:
        """The backend secret, first on a new connection (docs/protocol.md, Authentication)."""
        rid = next(self._ids)
        self._send(_encode({"cmd": "auth", "secret": secret, "id": rid}))
        reply = self._read_reply(rid)
        if reply.get("ok") is not True:
            self._drop()  # pushsvc closes it after a refusal
            raise AuthenticationFailed(str(reply.get("error", reply)), self.address)

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._rbuf.clear()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _usable(self) -> bool:
        """Whether the kept connection can take a request; drops it if not.

        Between calls nothing may be pending on the socket: if it is readable,
        the server has closed it (restart, idle cut) or sent garbage.  Finding
        that out *before* writing avoids the ambiguous case where a request is
        written to a dead connection and must be re-sent.
        """
        sock = self._sock
        if sock is None:
            return False
        if self._pid != os.getpid():
            # A forked child shares the parent's socket: replies would be
            # read by whichever process reads first.  Drop our copy of the
            # descriptor (the parent's connection stays open) and reconnect.
            self._drop()
            return False
        try:
            sock.settimeout(0.0)
            try:
                sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.settimeout(self.timeout)
        except BlockingIOError:
            return True  # nothing to read: alive as far as we can tell
        except OSError:
            pass  # reset, or any other failure
        self._drop()  # EOF, a reset, or unsolicited data
        return False

    # -- requests -----------------------------------------------------------------

    def request(self, request: dict[str, Any]) -> Reply:
        """Send one request (any command) and return its reply, without the ``id``.

        Raises RequestRejected if pushsvc answers with an error.  Any ``id`` in
        ``request`` is replaced: the client numbers requests itself.
        """
        return self.pipeline([request])[0]

    def pipeline(
        self, requests: Iterable[dict[str, Any]], *, raise_on_error: bool = True
    ) -> list[Reply]:
        """Send many requests in one write and read their replies: one round trip.

        Returns the replies in request order, each without its ``id``.  If
        pushsvc rejects any of them, the other requests still run; then
        RequestRejected is raised for the first rejected one (with all replies
        in ``replies``), or, with ``raise_on_error=False``, the rejected ones
        are returned as ``{"ok": False, "error": reason}``.
        """
        batch = [dict(r) for r in requests]
        if not batch:
            return []
        with self._lock:
            replies = self._round_trip(batch)
        if raise_on_error:
            for i, reply in enumerate(replies):
                if reply.get("ok") is False and "error" in reply:
                    raise RequestRejected(
                        str(reply["error"]), batch[i], reply, index=i, replies=replies
                    )
        return replies

    def _round_trip(self, batch: list[dict[str, Any]]) -> list[Reply]:
        ids: list[int] = []
        lines: list[bytes] = []
        for req in batch:
            rid = next(self._ids)
            req["id"] = rid
            ids.append(rid)
            lines.append(_encode(req))
        replies: list[Reply] = []
        tries = 1 + self.retries
        while True:
            refused = False
            try:
                if not self._usable():
                    refused = True
                    self._open()
                    refused = False
                self._send(b"".join(lines[len(replies) :]))
                while len(replies) < len(lines):
                    replies.append(self._read_reply(ids[len(replies)]))
                return replies
            except _Broken as e:
                self._drop()
                tries -= 1
                if tries <= 0:
                    what = "cannot reach" if refused else "lost the connection to"
                    raise PushConnectionError(
                        f"{what} pushsvc at {self.address}: {e}", replies
                    ) from e
                if refused and self.retry_delay > 0:
                    time.sleep(self.retry_delay)
            except TimeoutError as e:
                silent = not self._heard
                self._drop()
                hint = (
                    " (nothing came back at all: is it pushsvc's backend port? "
                    "Its WebSocket port, for one, answers nothing to a line)"
                    if silent
                    else ""
                )
                raise PushTimeout(
                    f"pushsvc at {self.address} did not answer within {self.timeout} s{hint}",
                    replies,
                ) from e
            except BaseException:
                self._drop()  # ProtocolError, KeyboardInterrupt: out of sync
                raise

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise
        except OSError as e:  # EPIPE, ECONNRESET, ...
            self._check_unread()  # a peer that answered and hung up: say what it said
            raise _Broken(str(e) or type(e).__name__) from e

    def _check_unread(self) -> None:
        """Raise ProtocolError if bytes that cannot start a reply are waiting to be read."""
        assert self._sock is not None
        try:
            data = self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except OSError:
            return
        if data:
            self._heard = True
            self._rbuf += data
            if not _may_start_reply(self._rbuf):
                raise self._not_a_reply(bytes(self._rbuf))

    def _readline(self) -> bytes:
        buf = self._rbuf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                return line
            start = len(buf)
            assert self._sock is not None
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                raise
            except OSError as e:
                raise _Broken(str(e) or type(e).__name__) from e
            if not chunk:
                raise _Broken("connection closed by pushsvc")
            self._heard = True
            buf += chunk
            if not _may_start_reply(buf):
                # An HTTP server's 400 or a banner may never end in a newline.
                raise self._not_a_reply(bytes(buf))

    def _read_reply(self, rid: int) -> Reply:
        line = self._readline()
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"error "):
            # An error pushsvc could not tie to an id (an over-long line): it
            # is still the reply to this request, since replies come in order.
            return {"ok": False, "error": line[6:].decode("utf-8", "replace")}
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise self._not_a_reply(line)
        if reply.get("id") != rid:
            raise ProtocolError(
                f"reply id {reply.get('id')!r} does not match request id {rid} from {self.address}"
            )
        del reply["id"]
        return reply

    def _not_a_reply(self, data: bytes) -> ProtocolError:
        """The error for bytes that are no pushsvc reply, showing them (escaped, truncated)."""
        shown = repr(data[:_SHOWN])[1:] + ("..." if len(data) > _SHOWN else "")
        if data.startswith(b"HTTP/"):
            hint = "an HTTP server answered, not pushsvc's backend port"
        else:
            hint = "is it pushsvc's backend port?"
        return ProtocolError(f"{self.address} sent {shown}, not a pushsvc reply ({hint})")

    # -- commands -------------------------------------------------------------------

    def push(
        self,
        uid: Target | None = None,
        data: Any = _MISSING,
        *,
        group: Target | None = None,
        exclude: Target | None = None,
        ttl: int | None = None,
    ) -> int:
        """Send ``data`` to every connection of a uid (or uids, or a group's members).

        Returns how many connections it was written to; 0 means nobody was
        online, which is not an error.  A string is delivered as is, any
        other JSON value as its JSON text.  With ``ttl`` (seconds) the push
        is also kept for clients that reconnect within it (docs/history.md).
        """
        return int(self.request(_push_request(uid, data, group, exclude, ttl))["delivered"])

    def push_many(self, pushes: Iterable[tuple[Target, Any]]) -> list[int]:
        """Push many ``(uid, data)`` pairs in one round trip; returns each one's delivered count."""
        replies = self.pipeline(_push_request(uid, data, None, None, None) for uid, data in pushes)
        return [int(r["delivered"]) for r in replies]

    def broadcast(self, data: Any, *, exclude: Target | None = None) -> int:
        """Send ``data`` to every authenticated connection; returns how many."""
        req: dict[str, Any] = {"cmd": "broadcast", "data": data}
        if exclude is not None:
            req["exclude"] = _target(exclude)
        return int(self.request(req)["delivered"])

    def online(self, uids: Target) -> dict[str, bool]:
        """Which of ``uids`` have at least one live connection, as ``{uid: bool}``."""
        return dict(self.request({"cmd": "online", "uid": _target(uids)})["online"])

    def is_online(self, uid: str) -> bool:
        """Whether one uid has at least one live connection."""
        return bool(self.online(uid).get(uid, False))

    def stats(self) -> Reply:
        """Counters of the service (``uids``, ``connections``, ``pending``, ...)."""
        reply = self.request({"cmd": "stats"})
        reply.pop("ok", None)
        return reply

    def join(self, uid: Target, group: Target) -> None:
        """Add uid(s) to group(s), so that a push to the group reaches them."""
        self.request({"cmd": "join", "uid": _target(uid), "group": _target(group)})

    def leave(self, uid: Target, group: Target) -> None:
        """Remove uid(s) from group(s)."""
        self.request({"cmd": "leave", "uid": _target(uid), "group": _target(group)})

    def disconnect(self, uid: Target, *, code: int | None = None, reason: str | None = None) -> int:
        """Close every connection of uid(s) (log-out, ban); returns how many were closed."""
        req: dict[str, Any] = {"cmd": "disconnect", "uid": _target(uid)}
        if code is not None:
            req["code"] = code
        if reason is not None:
            req["reason"] = reason
        return int(self.request(req)["closed"])

    def list_uids(self, *, after: str | None = None, limit: int | None = None) -> Reply:
        """One page of online uids: ``{"uids": [...], "next": cursor or None}``."""
        return self._page({"cmd": "list"}, after, limit)

    def members(self, group: str, *, after: str | None = None, limit: int | None = None) -> Reply:
        """One page of a group's members: ``{"uids": [...], "next": cursor or None}``."""
        return self._page({"cmd": "members", "group": group}, after, limit)

    def iter_uids(self, *, limit: int | None = None) -> Iterator[str]:
        """Every online uid, fetched page by page (``limit`` per page)."""
        return self._pages({"cmd": "list"}, limit)

    def iter_members(self, group: str, *, limit: int | None = None) -> Iterator[str]:
        """Every member of a group, fetched page by page (``limit`` per page)."""
        return self._pages({"cmd": "members", "group": group}, limit)

    def _page(self, req: dict[str, Any], after: str | None, limit: int | None) -> Reply:
        if after is not None:
            req["after"] = after
        if limit is not None:
            req["limit"] = limit
        reply = self.request(req)
        reply.pop("ok", None)
        return reply

    def _pages(self, req: dict[str, Any], limit: int | None) -> Iterator[str]:
        after = None
        while True:
            page = self._page(dict(req), after, limit)
            yield from page["uids"]
            after = page.get("next")
            if not after:
                return


_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    """A lock held by another thread when the process forked stays held in the
    child, where that thread does not exist: give every client a fresh one."""
    for client in list(_clients):
        client._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_in_child)


def _push_request(
    uid: Target | None, data: Any, group: Target | None, exclude: Target | None, ttl: int | None
) -> dict[str, Any]:
    if data is _MISSING:
        raise TypeError("push() needs data")
    if uid is None and group is None:
        raise TypeError("push() needs a uid or a group")
    req: dict[str, Any] = {"data": data}
    if uid is not None:
        req["uid"] = _target(uid)
    if group is not None:
        req["group"] = _target(group)
    if exclude is not None:
        req["exclude"] = _target(exclude)
    if ttl is not None:
        req["ttl"] = ttl
    return req


def _may_start_reply(data: bytearray) -> bool:
    """Whether ``data`` (not empty) can begin a reply to this client.

    This client always sends an ``id``, so every reply is a JSON object, or
    ``error ...`` for an over-long line (docs/protocol.md).
    """
    head = bytes(data[:6])
    return head.startswith(b"{") or b"error ".startswith(head)


def _encode(request: dict[str, Any]) -> bytes:
    """One request line.  Strict JSON: NaN or Infinity would be refused by pushsvc
    as invalid JSON *without* the id, so refuse them here, before anything is sent.

    Ended by ``\\r\\n``, which pushsvc accepts like ``\\n``: an HTTP server (the
    wrong port) answers such a line with a 400 at once, where after a bare
    ``\\n`` some (Twisted's) wait for the rest of a request that never comes.
    """
    return (
        json.dumps(request, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8"
        )
        + b"\r\n"
    )
