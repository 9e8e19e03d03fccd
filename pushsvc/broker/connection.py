"""One connection to Redis: pipelined commands, replies parsed by hiredis's C reader.

Built for throughput (docs/performance.md, *Redis clients*):

- commands issued in one reactor turn are written together, once, at the end
  of the turn (pipelining without a round trip per command);
- replies are parsed by ``hiredis.Reader`` (C) and handed, in order, to a
  plain callback per command: no Deferred unless a caller asks for one;
- a subscriber connection hands every pub/sub message straight to its
  owner's callback, without a Deferred and without pausing the transport.

No per-command timer either: a command is answered ``Unavailable`` only when
Redis really cannot be reached — the connection is down, or Redis has sent
nothing for ``timeout`` seconds while commands wait for it (then the
connection is dropped and made again).  Commands that merely queue behind
each other under load are not failed: a push that Redis took is not answered
``error``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pushsvc.errors import Unavailable

log = Logger()

# What a command's callback gets: the reply, or an exception instance
# (hiredis.ReplyError for a Redis error reply, Unavailable when it never came).
ReplyTo = Callable[[Any], None]


def ignore_reply(reply: Any) -> None:
    """The callback of a command whose reply nobody needs (handshake, (un)subscribe)."""


def publish_command(channel: bytes, message: bytes) -> bytes:
    """``PUBLISH channel message`` as Redis reads it: what ``hiredis.pack_command`` writes.

    Written here because it is every cluster push's command: hiredis formats
    each length with ``sprintf``, about 3,000 instructions per command, this
    about a fifth of that (tests/test_redis_connection.py checks they agree).
    """
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel),
        channel,
        len(message),
        message,
    )


class RedisConnection(Protocol):
    """A Redis connection that pipelines per reactor turn and parses replies with hiredis.

    ``handshake`` commands (AUTH, SELECT, ROLE check...) are sent first; the
    connection is *ready* when the last of them is answered without an error.
    A subscriber connection (``on_push`` given) hands every pub/sub message
    after the handshake to ``on_message(channel, data)`` (both bytes) and
    every other reply (``[b"subscribe", channel, n]``...) to ``on_push``.
    """

    def __init__(
        self,
        name: str,
        handshake: list[tuple[Any, ...]],
        check: Callable[[list[Any]], str | None],
        on_ready: Callable[[RedisConnection], None],
        on_lost: Callable[[RedisConnection], None],
        on_push: Callable[[list[Any]], None] | None = None,
        on_message: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self.name = name
        self._handshake = handshake
        self._check = check
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_push = on_push
        self._on_message = on_message
        # Subscriber replies stay bytes (payloads go to browsers as they are).
        self._reader = hiredis.Reader() if on_push else hiredis.Reader(encoding="utf-8")
        self._waiting: deque[ReplyTo] = deque()
        self._out: list[bytes] = []
        self._flush_call: Any = None
        self.ready = False
        self.last_reply = time.monotonic()
        # Subscriber: (un)subscription confirmations still to come (one per channel).
        self._expected = 0

    # -- connection -------------------------------------------------------------

    def connectionMade(self) -> None:
        self.last_reply = time.monotonic()
        answers: list[Any] = []

        def last(reply: Any) -> None:
            answers.append(reply)
            self._handshake_done(answers)

        *first, final = self._handshake
        for command in first:
            self.send(command, answers.append)
        self.send(final, last)

    def _handshake_done(self, answers: list[Any]) -> None:
        problem = next((str(a) for a in answers if isinstance(a, Exception)), None)
        problem = problem or self._check(answers)
        if problem:
            log.error("Redis {name}: {problem}", name=self.name, problem=problem)
            self.transport.loseConnection()
            return
        self.ready = True
        self._on_ready(self)

    def connectionLost(self, reason: object = None) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._out = []
        self._expected = 0
        was_ready, self.ready = self.ready, False
        self.fail_all(Unavailable(f"Redis {self.name} is unreachable"))
        if was_ready:
            self._on_lost(self)

    def fail_all(self, error: Exception) -> None:
        """Answer every waiting command with ``error`` (the connection is gone)."""
        waiting, self._waiting = self._waiting, deque()
        for reply_to in waiting:
            try:
                reply_to(error)
            except Exception:  # noqa: BLE001 - one caller's bug must not lose the others' answers
                log.failure("Redis reply callback failed")

    # -- commands ---------------------------------------------------------------

    def send(self, command: tuple[Any, ...] | bytes, reply_to: ReplyTo) -> None:
        """Queue ``command``; ``reply_to`` gets its reply (or an exception instance).

        ``command`` is a tuple of arguments, or a command already packed
        (:func:`publish_command`; not on a subscriber connection).
        """
        if not self._waiting and not self._expected:
            self.last_reply = time.monotonic()  # the silence starts with this command
        packed = type(command) is bytes
        if not packed and self._on_push is not None and self.ready:
            self._expected += len(command) - 1  # SUBSCRIBE a b c: three confirmations
        else:
            self._waiting.append(reply_to)
        self._out.append(command if packed else hiredis.pack_command(command))
        if self._flush_call is None:
            self._flush_call = reactor.callLater(0, self._flush)

    def command(self, *args: Any) -> Deferred[Any]:
        """One command as a Deferred, for callers that are not on a hot path."""
        d: Deferred[Any] = Deferred()
        self.send(args, lambda r: d.errback(r) if isinstance(r, Exception) else d.callback(r))
        return d

    @property
    def in_flight(self) -> int:
        """Commands sent (or about to be) and not yet answered."""
        return len(self._waiting)

    def _flush(self) -> None:
        self._flush_call = None
        out, self._out = self._out, []
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    # -- replies ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        self.last_reply = time.monotonic()
        on_push = self._on_push
        try:
            reply = reader.gets()
            if on_push is not None and self.ready:  # a subscriber: messages, confirmations
                on_message = self._on_message
                while reply is not False:
                    if reply[0] == b"message":
                        on_message(reply[1], reply[2])  # type: ignore[misc]
                    else:
                        self._expected = max(0, self._expected - 1)
                        on_push(reply)
                    reply = reader.gets()
                return
            waiting = self._waiting
            while reply is not False:
                waiting.popleft()(reply)
                if on_push is not None and self.ready:  # the handshake ended: pushes follow
                    self.dataReceived(b"")
                    return
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as e:
            # Not Redis, or a reply nobody asked for: nothing after it can be trusted.
            log.error("Redis {name}: {error}; reconnecting", name=self.name, error=e)
            self.transport.abortConnection()

    def silent_for(self, now: float) -> float:
        """Seconds Redis has said nothing while commands wait for it (0: none waits)."""
        return now - self.last_reply if self._waiting or self._expected else 0.0


class RedisConnectionFactory(Factory):
    """Builds one connection per (re)connect, with its owner's callbacks."""

    noisy = False  # no "Starting factory" line per reconnect

    def __init__(self, build: Callable[[], RedisConnection]) -> None:
        self._build = build
        self.current: RedisConnection | None = None  # the latest connection (for the watchdog)

    def buildProtocol(self, addr: object) -> RedisConnection:
        proto = self.current = self._build()
        proto.factory = self
        return proto
