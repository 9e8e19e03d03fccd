"""The backend line frontend: newline-delimited JSON over TCP.

Exactly one reply line per request line, in request order, so a backend may
pipeline many lines in one write.  This module only turns bytes into requests
and results into bytes; the command model does the work.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from pushsvc import commands, jsoncodec
from pushsvc.access import BackendGate, auth_again, is_auth_request
from pushsvc.fastpath import write_now
from pushsvc.registry import Registry

OK = b"ok\n"
FAIL = b"fail\n"
QUEUED = b"queued\n"  # a push with a ttl that nobody got now, stored for later


def error_line(reason: str, rid: Any = None) -> bytes:
    """An error reply: ``error <reason>``, or a JSON object when the request had an id."""
    if rid is not None:
        return jsoncodec.dumps({"id": rid, "ok": False, "error": reason}) + b"\n"
    return b"error " + reason.replace("\n", " ").encode("utf-8", "replace") + b"\n"


def result_line(cmd: commands.Command, result: dict, rid: Any) -> bytes:
    if rid is not None:
        return jsoncodec.dumps({"id": rid, **result}) + b"\n"
    if cmd.delivery:
        if not result["ok"]:
            return FAIL
        return OK if result["delivered"] else QUEUED
    return orjson.dumps(result) + b"\n"


def decode_error(line: bytes, exc: Exception) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    return f"invalid JSON: {exc}"


class BackendProtocol(LineReceiver):
    """One backend connection.

    ``dataReceived`` is overridden (LineReceiver would drop every line that
    follows an over-long one in the same buffer, and would write one reply per
    line); it splits a whole read at once, answers every line, and writes all
    the replies in one call.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, registry: Registry, max_line: int, gate: BackendGate | None = None) -> None:
        self.registry = registry
        self.MAX_LENGTH = max_line
        self.gate = gate
        self._buffer = b""
        self._discarding = False  # inside an over-long line, until its newline
        self._waiting: deque[list[bytes | None]] | None = None

    def connectionMade(self) -> None:
        self.registry.metrics.backend_connections += 1
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        # Backpressure: a backend that writes requests but does not read its
        # replies makes Twisted pause us (LineReceiver's pauseProducing stops
        # reading from the socket) instead of buffering replies without bound.
        self.transport.registerProducer(self, True)
        if self.gate is not None:
            self.gate.connection_made(self)  # --backend-secret: the first line must be auth

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        replies: list[bytes | Deferred[bytes]] = []
        start = 0
        limit = self.MAX_LENGTH
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False  # that newline ended the over-long line
            elif len(line) > limit:
                replies.append(error_line(f"line longer than {limit} bytes"))
            else:
                replies.append(self.lineReceived(line))
        rest = buf[start:]
        if len(rest) > limit:
            if not self._discarding:
                replies.append(error_line(f"line longer than {limit} bytes"))
                self._discarding = True
            rest = b""
        self._buffer = rest
        if replies:
            self._send(replies)

    def lineReceived(self, line: bytes) -> bytes | Deferred[bytes]:
        """Answer one request line (without its newline)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return error_line("empty line")
        try:
            request = jsoncodec.loads(line)
        except orjson.JSONDecodeError as e:
            return error_line(decode_error(line, e))
        rid = commands.request_id(request)
        try:
            cmd, result = commands.execute(self.registry, request)
        except commands.RequestError as e:
            if is_auth_request(request):  # not a command: the line protocol's own
                return auth_again(self.gate, request)
            return error_line(e.reason, rid)
        except Exception:
            self.log.failure("command failed")
            return error_line("internal error", rid)
        if type(result) is not dict and isinstance(result, Deferred):
            return result.addCallbacks(
                lambda r: result_line(cmd, r, rid), lambda f: self._failed(f, rid)
            )
        return result_line(cmd, result, rid)

    def _failed(self, failure: Failure, rid: Any) -> bytes:
        """An error reply for a command that failed later (in cluster mode, waiting on Redis)."""
        reason = getattr(failure.value, "reason", None)
        if reason is None:
            self.log.failure("command failed", failure)
            reason = "internal error"
        return error_line(reason, rid)

    def lineLengthExceeded(self, line: bytes) -> None:  # pragma: no cover - not used
        """Over-long lines are answered in dataReceived; never drop the connection."""

    # -- ordered replies ------------------------------------------------------

    def _send(self, replies: list[bytes | Deferred[bytes]]) -> None:
        if self._waiting is None and all(type(r) is bytes for r in replies):
            write_now(self.transport, b"".join(replies))  # type: ignore[arg-type]
            return
        if self._waiting is None:
            self._waiting = deque()
        for reply in replies:
            # One slot per reply, filled when its Deferred fires: replies go
            # out in request order without searching the queue.
            slot: list[bytes | None] = [None]
            self._waiting.append(slot)
            if type(reply) is bytes:
                slot[0] = reply
            else:
                reply.addBoth(self._resolved, slot)  # type: ignore[union-attr]
        self._flush()

    def _resolved(self, value: bytes, slot: list[bytes | None]) -> None:
        slot[0] = value
        if self._waiting is not None:
            self._flush()

    def _flush(self) -> None:
        waiting = self._waiting
        ready = []
        while waiting and waiting[0][0] is not None:
            ready.append(waiting.popleft()[0])
        if ready and self.transport is not None:
            self.transport.write(b"".join(ready))  # type: ignore[arg-type]
        if not waiting:
            self._waiting = None

    def connectionLost(self, reason: object = None) -> None:
        self.registry.metrics.backend_connections -= 1
        self._waiting = None


class BackendFactory(Factory):
    """Creates backend connections bound to the shared registry."""

    def __init__(
        self, registry: Registry, max_line: int = 1 << 20, gate: BackendGate | None = None
    ) -> None:
        self.registry = registry
        self.max_line = max_line
        self.gate = gate

    def buildProtocol(self, addr: object) -> BackendProtocol:
        proto = BackendProtocol(self.registry, self.max_line, self.gate)
        proto.factory = self
        return proto
