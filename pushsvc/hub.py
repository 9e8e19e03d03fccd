"""The hub: this process's connections, and nothing else.

It indexes authenticated connections by uid and by group and delivers a
prepared frame to them.  It knows nothing of other nodes, history or
metrics: the node (pushsvc.node) coordinates those and hears from the hub
when a uid gets its first connection here or loses its last.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet import defer

NOBODY: frozenset[str] = frozenset()


_prepare = PreparedMessage.__init__


class Frame(PreparedMessage):
    """A text frame framed once per push and shared by every connection it reaches.

    Autobahn's PreparedMessage itself (``payload`` the text, ``payloadHybi``
    the frame), so a push allocates one object.  A stored push (one with a
    history position) also carries its ``plain`` twin, the bare payload, for
    connections that did not ask for envelopes; ``channel`` and ``offset``
    let a recovering connection drop what its replay already covered without
    parsing the frame.
    """

    channel: str | None = None
    offset = 0
    plain: Frame | None = None

    def __init__(
        self, data: bytes, channel: str | None = None, offset: int = 0, plain: Frame | None = None
    ) -> None:
        _prepare(self, data, False, False, False)
        self.channel = channel
        self.offset = offset
        self.plain = plain


class Connection(Protocol):
    """What the hub needs from a client connection (the WebSocket frontend's protocol)."""

    def deliver(self, frame: Frame) -> bool:
        """Send a frame (or hold it while the connection recovers its history).

        False only when the connection turned out to be gone (its peer reset
        it): the frame will not arrive and is not counted as delivered.
        """

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with an application close code."""

    def go_away(self) -> None:
        """Close with 1001: the server is shutting down."""


def _nothing(uid: str) -> None:
    pass


class Hub:
    """uid -> live connections, group memberships, pending connections; local only.

    Connections are *attached* when their WebSocket opens, *identified* when
    they authenticate and *detached* when they close.  Attached connections
    that have not identified are kept in arrival order, so the auth timeout
    is one sweep instead of a timer per connection.

    A group holds uids (joined by a backend: the membership covers the uid's
    current and future connections and outlives them until the uid leaves)
    and connections (joined through their token's ``groups`` claim, for as
    long as that connection lives).
    """

    def __init__(
        self,
        on_first: Callable[[str], None] = _nothing,
        on_last: Callable[[str], None] = _nothing,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._on_first = on_first
        self._on_last = on_last
        self._clock = clock or time.monotonic
        self._by_uid: dict[str, set[Connection]] = {}
        self._uid_of: dict[Connection, str] = {}
        self._anonymous: dict[Connection, float] = {}
        self._group_uids: dict[str, set[str]] = {}
        self._group_conns: dict[str, set[Connection]] = {}
        self._conn_groups: dict[Connection, tuple[str, ...]] = {}
        self._emptied: list[defer.Deferred[None]] = []
        self.frames_sent = 0  # frames written to connections, and their payload bytes
        self.bytes_sent = 0

    # -- lifecycle -----------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        """Note a new, not yet authenticated connection."""
        self._anonymous[conn] = self._clock()

    def identify(self, conn: Connection, uid: str, groups: Collection[str] = ()) -> bool:
        """Bind an attached connection to its uid (and token groups); False if it is gone."""
        if self._anonymous.pop(conn, None) is None:
            return False
        self._uid_of[conn] = uid
        conns = self._by_uid.get(uid)
        if conns is None:
            self._by_uid[uid] = {conn}
            self._on_first(uid)
        else:
            conns.add(conn)
        if groups:
            self._conn_groups[conn] = tuple(groups)
            for group in groups:
                self._group_conns.setdefault(group, set()).add(conn)
        return True

    def detach(self, conn: Connection) -> None:
        """Forget a closed connection (safe to call for unknown ones)."""
        if self._anonymous.pop(conn, None) is None:
            uid = self._uid_of.pop(conn, None)
            if uid is not None:
                conns = self._by_uid[uid]
                conns.discard(conn)
                if not conns:
                    del self._by_uid[uid]
                    self._on_last(uid)
                for group in self._conn_groups.pop(conn, ()):
                    members = self._group_conns[group]
                    members.discard(conn)
                    if not members:
                        del self._group_conns[group]
        if self._emptied and not self._uid_of and not self._anonymous:
            emptied, self._emptied = self._emptied, []
            for d in emptied:
                if not d.called:  # a drain that gave up fired it already
                    d.callback(None)

    def waiting_since(self) -> Iterator[tuple[Connection, float]]:
        """Unauthenticated connections with their open time, oldest first."""
        return iter(list(self._anonymous.items()))

    def everyone(self) -> list[Connection]:
        """Every connection, pending ones first."""
        return [*self._anonymous, *self._uid_of]

    def is_attached(self, conn: Connection) -> bool:
        return conn in self._uid_of or conn in self._anonymous

    def when_empty(self) -> defer.Deferred[None]:
        """Fires once the last connection is detached (at once if there is none)."""
        if not self._uid_of and not self._anonymous:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(d)
        return d

    # -- delivery ------------------------------------------------------------

    def push(self, uids: Iterable[str], frame: Frame | bytes) -> int:
        """Deliver ``frame`` to every connection of each uid; how many.

        Given bytes, the Frame is made only once someone is found: an offline
        push allocates nothing.
        """
        reached = 0
        by_uid = self._by_uid
        for uid in uids:
            conns = by_uid.get(uid)
            if conns:
                if type(frame) is bytes:
                    frame = Frame(frame)
                for conn in conns:
                    if conn.deliver(frame):
                        reached += 1
        if reached:
            self.frames_sent += reached
            self.bytes_sent += reached * len(frame.payload)  # type: ignore[union-attr]
        return reached

    def push_groups(
        self, groups: Iterable[str], frame: Frame, exclude: Collection[str] = NOBODY
    ) -> int:
        """Deliver ``frame`` once to every connection in any of ``groups``."""
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
        return self._deliver_all(targets, frame)

    def broadcast(self, frame: Frame, exclude: Collection[str] = NOBODY) -> int:
        """Deliver ``frame`` to every authenticated connection but those of ``exclude``."""
        if exclude:
            return self._deliver_all(
                [c for c, u in self._uid_of.items() if u not in exclude], frame
            )
        return self._deliver_all(list(self._uid_of), frame)

    def _deliver_all(self, conns: Collection[Connection], frame: Frame) -> int:
        sent = 0
        for conn in conns:
            if conn.deliver(frame):
                sent += 1
        self.count_sent(sent, sent * len(frame.payload))
        return sent

    def count_sent(self, frames: int, size: int) -> None:
        """Count frames sent, ``size`` bytes in all (also a replay's, written past the hub).

        ``push`` counts inline: it runs once per push line.
        """
        self.frames_sent += frames
        self.bytes_sent += size

    def disconnect(self, uids: Iterable[str], code: int, reason: str) -> int:
        """Close every connection of ``uids`` (logout, ban); how many."""
        closing = [conn for uid in uids for conn in self._by_uid.get(uid, ())]
        for conn in closing:
            conn.close(code, reason)
        return len(closing)

    # -- groups --------------------------------------------------------------

    def join(self, uids: Iterable[str], groups: Iterable[str]) -> None:
        """Put uids in groups, for their current and future connections."""
        uids = list(uids)
        for group in groups:
            self._group_uids.setdefault(group, set()).update(uids)

    def leave(self, uids: Iterable[str], groups: Iterable[str]) -> None:
        """Take uids out of groups (token memberships of live connections stay)."""
        uids = list(uids)
        for group in groups:
            members = self._group_uids.get(group)
            if members is not None:
                members.difference_update(uids)
                if not members:
                    del self._group_uids[group]

    def replace_joined(self, groups: dict[str, set[str]]) -> None:
        """Adopt memberships kept elsewhere (a cluster's, after a reconnect)."""
        self._group_uids = {group: set(uids) for group, uids in groups.items() if uids}

    def members(self, group: str) -> set[str]:
        """Uids in a group: joined by a backend, or holding a connection with the group's token."""
        members = set(self._group_uids.get(group, ()))
        members.update(self._uid_of[conn] for conn in self._group_conns.get(group, ()))
        return members

    def in_group(self, uid: str, group: str) -> bool:
        """Whether a backend joined ``uid`` to ``group`` (token groups are per connection)."""
        return uid in self._group_uids.get(group, ())

    # -- counts ----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Online uids, authenticated connections, pending connections and groups."""
        return {
            "uids": len(self._by_uid),
            "connections": len(self._uid_of),
            "pending": len(self._anonymous),
            "groups": self.group_count(),
        }

    def group_count(self) -> int:
        return len(self._group_uids.keys() | self._group_conns.keys())

    def online_uids(self) -> Collection[str]:
        return self._by_uid.keys()

    def connections_of(self, uid: str) -> int:
        return len(self._by_uid.get(uid, ()))


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
