"""The registry: the single owner of who is connected.

Both frontends hand it connections and ask it to deliver; nothing else keeps
or mutates connection state.  A cluster layer plugs in here: it wraps the
same calls and adds routing across nodes.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from pushsvc.metrics import Metrics

if TYPE_CHECKING:
    from pushsvc.cluster import Cluster
    from pushsvc.history import History

NOBODY: frozenset[str] = frozenset()
DRAIN_STEP = 0.05  # seconds between batches of 1001 closes during --drain-window


class Connection(Protocol):
    """What the registry needs from a client connection (an Autobahn protocol)."""

    def sendPreparedMessage(self, preparedMsg: PreparedMessage) -> None: ...

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None: ...

    def goAway(self) -> None:
        """Close with 1001 (going away): the server is shutting down."""


def frame(payload: bytes) -> PreparedMessage:
    """Frame a text payload once, so fan-out copies bytes instead of re-framing."""
    return PreparedMessage(payload, False, False, False)


class Registry(Service):
    """Maps uid -> every live authenticated connection of that uid, and groups.

    Connections are *attached* when their WebSocket opens, *identified* when
    they authenticate and *detached* when they close.  Connections that are
    attached but not yet identified are kept in arrival order so the auth
    timeout can be enforced with one sweep instead of a timer per connection.

    A group holds uids (joined by a backend; the membership covers the uid's
    current and future connections and outlives them until the uid leaves)
    and connections (joined through their token's ``groups`` claim, for as
    long as that connection lives).
    """

    log = Logger()

    def __init__(
        self, drain_timeout: float = 5.0, clock=reactor, drain_window: float = 0.0
    ) -> None:
        self.metrics = Metrics()
        self._by_uid: dict[str, set[Connection]] = {}
        self._uid_of: dict[Connection, str] = {}
        self._anonymous: dict[Connection, float] = {}
        self._group_uids: dict[str, set[str]] = {}
        self._group_conns: dict[str, set[Connection]] = {}
        self._conn_groups: dict[Connection, tuple[str, ...]] = {}
        self._drain_timeout = drain_timeout
        self._drain_window = drain_window
        self._drained: defer.Deferred[None] | None = None
        self._clock = clock
        # Set by the cluster layer (pushsvc.cluster) when --redis is given:
        # then every public delivery and presence call also routes through
        # Redis, and the results may be Deferreds.
        self.cluster: Cluster | None = None
        # Set by pushsvc.history.History: stored pushes (ttl) and recovery.
        self.history: History | None = None

    # -- connection lifecycle (called by the WebSocket frontend) ---------

    def attach(self, conn: Connection) -> None:
        """Note a new, not yet authenticated connection."""
        self._anonymous[conn] = time.monotonic()

    def identify(self, conn: Connection, uid: str, groups: Collection[str] = ()) -> None:
        """Bind an attached connection to its uid (and token groups); pushes reach it now."""
        if self._anonymous.pop(conn, None) is None:
            return  # already closed or identified: nothing to bind
        self._uid_of[conn] = uid
        conns = self._by_uid.get(uid)
        if conns is None:
            self._by_uid[uid] = {conn}
            if self.cluster is not None:
                self.cluster.uid_online(uid)
        else:
            conns.add(conn)
        if groups:
            self._conn_groups[conn] = tuple(groups)
            for group in groups:
                self._group_conns.setdefault(group, set()).add(conn)

    def detach(self, conn: Connection) -> None:
        """Forget a closed connection (safe to call for unknown ones)."""
        if self._anonymous.pop(conn, None) is None:
            uid = self._uid_of.pop(conn, None)
            if uid is not None:
                conns = self._by_uid[uid]
                conns.discard(conn)
                if not conns:
                    del self._by_uid[uid]
                    if self.cluster is not None:
                        self.cluster.uid_offline(uid)
                for group in self._conn_groups.pop(conn, ()):
                    members = self._group_conns[group]
                    members.discard(conn)
                    if not members:
                        del self._group_conns[group]
        if self._drained is not None and not self._uid_of and not self._anonymous:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def waiting_since(self) -> Iterator[tuple[Connection, float]]:
        """Unauthenticated connections with their open time, oldest first."""
        return iter(list(self._anonymous.items()))

    # -- the public API: what the command model calls -----------------------
    #
    # Each call acts on this node's connections at once; with a cluster it
    # also routes through Redis and may return a Deferred of the cluster-wide
    # result.  Without a cluster the results are plain values.

    def push(self, uids: list[str], payload: bytes) -> int | defer.Deferred[int]:
        """Send ``payload`` to every connection of each uid; how many were reached."""
        reached = self.local_push(uids, payload)
        if self.cluster is None:
            return reached
        return self.cluster.push(uids, payload, reached)

    def push_groups(
        self, groups: list[str], payload: bytes, exclude: Collection[str] = NOBODY
    ) -> int | defer.Deferred[int]:
        """Send ``payload`` once to every connection in any of ``groups``."""
        reached = self.local_push_groups(groups, payload, exclude)
        if self.cluster is None:
            return reached
        return self.cluster.fan_out("group", reached, groups=groups, exclude=exclude, data=payload)

    def broadcast(
        self, payload: bytes, exclude: Collection[str] = NOBODY
    ) -> int | defer.Deferred[int]:
        """Send ``payload`` to every authenticated connection (but those of ``exclude``)."""
        reached = self.local_broadcast(payload, exclude)
        if self.cluster is None:
            return reached
        return self.cluster.fan_out("broadcast", reached, exclude=exclude, data=payload)

    def disconnect(self, uids: list[str], code: int, reason: str) -> int | defer.Deferred[int]:
        """Close every connection of ``uids`` (logout, ban); how many were closed."""
        closed = self.local_disconnect(uids, code, reason)
        if self.cluster is None:
            return closed
        return self.cluster.fan_out("disconnect", closed, uids=uids, code=code, reason=reason)

    def join(self, uids: list[str], groups: list[str]) -> None | defer.Deferred[None]:
        """Put uids in groups, for their current and future connections."""
        self.local_join(uids, groups)
        if self.cluster is not None:
            return self.cluster.membership("join", uids, groups)
        return None

    def leave(self, uids: list[str], groups: list[str]) -> None | defer.Deferred[None]:
        """Take uids out of groups."""
        self.local_leave(uids, groups)
        if self.cluster is not None:
            return self.cluster.membership("leave", uids, groups)
        return None

    def online(self, uids: list[str]) -> dict[str, bool] | defer.Deferred[dict[str, bool]]:
        """Which of ``uids`` have a live connection (anywhere in the cluster)."""
        local = {uid: uid in self._by_uid for uid in uids}
        if self.cluster is None or all(local.values()):
            return local
        return self.cluster.online(local)

    def counts(self) -> dict[str, int] | defer.Deferred[dict[str, int]]:
        """Online uids, connections, pending connections and groups."""
        local = {
            "uids": len(self._by_uid),
            "connections": len(self._uid_of),
            "pending": len(self._anonymous),
            "groups": self.group_count(),
        }
        if self.cluster is None:
            return local
        return self.cluster.counts(local)

    def list_online(
        self, after: str | None, limit: int
    ) -> tuple[list[str], str | None, int] | defer.Deferred[tuple[list[str], str | None, int]]:
        """A page of online uids, the cursor for the next page, and how many there are."""
        if self.cluster is not None:
            return self.cluster.list_online(after, limit)
        chunk, next_after = page(self._by_uid.keys(), after, limit)
        return chunk, next_after, len(self._by_uid)

    # -- local delivery (this node's connections only) -----------------------

    def local_push(self, uids: Iterable[str], payload: bytes) -> int:
        """Send ``payload`` to every local connection of each uid; return how many."""
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
        if reached:
            self._sent(reached, len(payload))
        return reached

    def local_push_groups(
        self, groups: Iterable[str], payload: bytes, exclude: Collection[str] = NOBODY
    ) -> int:
        """Send ``payload`` once to every connection in any of ``groups``."""
        targets: set[Connection] = set()
        by_uid, uid_of = self._by_uid, self._uid_of
        for group in groups:
            for uid in self._group_uids.get(group, ()):
                conns = by_uid.get(uid)
                if conns and uid not in exclude:
                    targets.update(conns)
            for conn in self._group_conns.get(group, ()):
                if uid_of[conn] not in exclude:
                    targets.add(conn)
        return self._send_all(targets, payload)

    def local_broadcast(self, payload: bytes, exclude: Collection[str] = NOBODY) -> int:
        """Send ``payload`` to every authenticated connection (but those of ``exclude``)."""
        if exclude:
            targets: Iterable[Connection] = [c for c, u in self._uid_of.items() if u not in exclude]
        else:
            targets = self._uid_of
        return self._send_all(targets, payload)

    def _send_all(self, conns: Collection[Connection], payload: bytes) -> int:
        if not conns:
            return 0
        prepared = frame(payload)
        for conn in conns:
            conn.sendPreparedMessage(prepared)
        self._sent(len(conns), len(payload))
        return len(conns)

    def _sent(self, frames: int, size: int) -> None:
        metrics = self.metrics
        metrics.frames_sent += frames
        metrics.bytes_sent += frames * size

    def local_disconnect(self, uids: Iterable[str], code: int, reason: str) -> int:
        """Close every connection of ``uids`` (logout, ban); return how many."""
        closing = [conn for uid in uids for conn in self._by_uid.get(uid, ())]
        for conn in closing:
            conn.sendClose(code, reason)
        if closing:
            self.metrics.disconnects["backend"] += len(closing)
        return len(closing)

    # -- groups --------------------------------------------------------------

    def local_join(self, uids: Iterable[str], groups: Iterable[str]) -> None:
        """Put uids in groups, for their current and future connections."""
        uids = list(uids)
        for group in groups:
            self._group_uids.setdefault(group, set()).update(uids)

    def local_leave(self, uids: Iterable[str], groups: Iterable[str]) -> None:
        """Take uids out of groups (token memberships of live connections stay)."""
        uids = list(uids)
        for group in groups:
            members = self._group_uids.get(group)
            if members is not None:
                members.difference_update(uids)
                if not members:
                    del self._group_uids[group]

    def replace_joined(self, groups: dict[str, set[str]]) -> None:
        """Adopt the cluster's memberships (after a Redis connect: leaves may have been missed)."""
        self._group_uids = {group: set(uids) for group, uids in groups.items() if uids}

    def members(self, group: str) -> set[str]:
        """Uids in a group: joined by a backend, or holding a connection with the group's token."""
        members = set(self._group_uids.get(group, ()))
        members.update(self._uid_of[conn] for conn in self._group_conns.get(group, ()))
        return members

    def in_group(self, uid: str, group: str) -> bool:
        """Whether a backend joined ``uid`` to ``group`` (token groups are per connection)."""
        return uid in self._group_uids.get(group, ())

    def group_count(self) -> int:
        return len(self._group_uids.keys() | self._group_conns.keys())

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

    def online_uids(self) -> Iterable[str]:
        return self._by_uid.keys()

    def connections_of(self, uid: str) -> frozenset[Connection]:
        return frozenset(self._by_uid.get(uid, ()))

    # -- service -----------------------------------------------------------

    def stopService(self) -> defer.Deferred[None] | None:
        """Close every WebSocket with 1001 and hold shutdown until they are gone (bounded).

        The closes are spread in random order over ``drain_window`` seconds,
        so that the browsers do not all reconnect to the next node at once;
        ``drain_timeout`` more seconds are then allowed for close handshakes.
        """
        super().stopService()
        conns = list(self._anonymous) + list(self._uid_of)
        if not conns:
            return None
        window = self._drain_window
        self.log.info(
            "closing {count} WebSocket connection(s) with 1001 over {window} s",
            count=len(conns),
            window=window,
        )
        self._drained = defer.Deferred()
        random.shuffle(conns)
        steps = max(1, round(window / DRAIN_STEP))
        batches = [
            conns[i * len(conns) // steps : (i + 1) * len(conns) // steps] for i in range(steps)
        ]
        calls = [
            self._clock.callLater(i * window / steps, self._go_away, batch)
            for i, batch in enumerate(batches)
            if i and batch
        ]
        calls.append(self._clock.callLater(window + self._drain_timeout, self._give_up))
        drained = self._drained
        self._go_away(batches[0])

        def cancel_timers(result: None) -> None:
            for call in calls:
                if call.active():
                    call.cancel()

        drained.addCallback(cancel_timers)
        return drained

    def _go_away(self, conns: list[Connection]) -> None:
        for conn in conns:
            if conn not in self._uid_of and conn not in self._anonymous:
                continue  # closed on its own meanwhile
            try:
                conn.goAway()
            except Exception:
                self.log.failure("closing a connection failed")

    def _give_up(self) -> None:
        if self._drained is not None:
            left = len(self._uid_of) + len(self._anonymous)
            self.log.warn("drain timeout: {left} connection(s) still open", left=left)
            drained, self._drained = self._drained, None
            drained.callback(None)


def page(uids: Iterable[str], after: str | None, limit: int) -> tuple[list[str], str | None]:
    """One page of uids in sorted order after ``after``, and the cursor for the next page.

    O(n log limit): no full sort of a million uids for a page of a hundred.
    """
    if after is not None:
        uids = (u for u in uids if u > after)
    chunk = heapq.nsmallest(limit + 1, uids)
    if len(chunk) > limit:
        return chunk[:limit], chunk[limit - 1]
    return chunk, None
