"""The registry: the single owner of who is connected.

Both frontends hand it connections and ask it to deliver; nothing else keeps
or mutates connection state.  A later cluster layer plugs in here: it wraps
the same calls and adds routing across nodes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.logger import Logger


class Connection(Protocol):
    """What the registry needs from a client connection (an Autobahn protocol)."""

    def sendPreparedMessage(self, preparedMsg: PreparedMessage) -> None: ...

    def goAway(self) -> None:
        """Close with 1001 (going away): the server is shutting down."""


def frame(payload: bytes) -> PreparedMessage:
    """Frame a text payload once, so fan-out copies bytes instead of re-framing."""
    return PreparedMessage(payload, False, False, False)


class Registry(Service):
    """Maps uid -> every live authenticated connection of that uid.

    Connections are *attached* when their WebSocket opens, *identified* when
    they authenticate and *detached* when they close.  Connections that are
    attached but not yet identified are kept in arrival order so the auth
    timeout can be enforced with one sweep instead of a timer per connection.
    """

    log = Logger()

    def __init__(self, drain_timeout: float = 5.0, clock=reactor) -> None:
        self._by_uid: dict[str, set[Connection]] = {}
        self._uid_of: dict[Connection, str] = {}
        self._anonymous: dict[Connection, float] = {}
        self._drain_timeout = drain_timeout
        self._drained: defer.Deferred[None] | None = None
        self._clock = clock

    # -- connection lifecycle (called by the WebSocket frontend) ---------

    def attach(self, conn: Connection) -> None:
        """Note a new, not yet authenticated connection."""
        self._anonymous[conn] = time.monotonic()

    def identify(self, conn: Connection, uid: str) -> None:
        """Bind an attached connection to its uid; from now on pushes reach it."""
        if self._anonymous.pop(conn, None) is None:
            return  # already closed or identified: nothing to bind
        self._uid_of[conn] = uid
        conns = self._by_uid.get(uid)
        if conns is None:
            self._by_uid[uid] = {conn}
        else:
            conns.add(conn)

    def detach(self, conn: Connection) -> None:
        """Forget a closed connection (safe to call for unknown ones)."""
        if self._anonymous.pop(conn, None) is None:
            uid = self._uid_of.pop(conn, None)
            if uid is not None:
                conns = self._by_uid[uid]
                conns.discard(conn)
                if not conns:
                    del self._by_uid[uid]
        if self._drained is not None and not self._uid_of and not self._anonymous:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def waiting_since(self) -> Iterator[tuple[Connection, float]]:
        """Unauthenticated connections with their open time, oldest first."""
        return iter(list(self._anonymous.items()))

    # -- delivery (called through the command model) ----------------------

    def push(self, uids: Iterable[str], payload: bytes) -> int:
        """Send ``payload`` to every connection of each uid; return how many were reached."""
        prepared = None
        reached = 0
        by_uid = self._by_uid
        for uid in uids:
            conns = by_uid.get(uid)
            if conns:
                if prepared is None:
                    prepared = frame(payload)
                for conn in conns:
                    conn.sendPreparedMessage(prepared)
                reached += len(conns)
        return reached

    def broadcast(self, payload: bytes) -> int:
        """Send ``payload`` to every authenticated connection."""
        if not self._uid_of:
            return 0
        prepared = frame(payload)
        for conn in self._uid_of:
            conn.sendPreparedMessage(prepared)
        return len(self._uid_of)

    # -- presence ----------------------------------------------------------

    def is_online(self, uid: str) -> bool:
        return uid in self._by_uid

    def online_count(self) -> int:
        """Number of distinct uids with at least one live connection."""
        return len(self._by_uid)

    def connection_count(self) -> int:
        """Number of authenticated connections."""
        return len(self._uid_of)

    def pending_count(self) -> int:
        """Number of connections that have not authenticated yet."""
        return len(self._anonymous)

    def connections_of(self, uid: str) -> frozenset[Connection]:
        return frozenset(self._by_uid.get(uid, ()))

    # -- service -----------------------------------------------------------

    def stopService(self) -> defer.Deferred[None] | None:
        """Close every WebSocket with 1001 and hold shutdown until they are gone (bounded)."""
        super().stopService()
        conns = list(self._anonymous) + list(self._uid_of)
        if not conns:
            return None
        self.log.info("closing {count} WebSocket connection(s) with 1001", count=len(conns))
        self._drained = defer.Deferred()
        for conn in conns:
            try:
                conn.goAway()
            except Exception:
                self.log.failure("closing a connection failed")
        timeout = self._clock.callLater(self._drain_timeout, self._give_up)
        drained = self._drained

        def cancel_timeout(result: None) -> None:
            if timeout.active():
                timeout.cancel()

        drained.addCallback(cancel_timeout)
        return drained

    def _give_up(self) -> None:
        if self._drained is not None:
            left = len(self._uid_of) + len(self._anonymous)
            self.log.warn("drain timeout: {left} connection(s) still open", left=left)
            drained, self._drained = self._drained, None
            drained.callback(None)
