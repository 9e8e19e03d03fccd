"""The node: the one API the command model calls, coordinating hub, broker and history.

Every call acts on this process's connections first (the hub), then reaches
the other nodes through the broker; one node runs the in-memory broker
through the same code as a cluster.  The node is also the broker's handler
(``BrokerHandler``): what other nodes send arrives here and goes to the hub.
Answers are plain values when the broker answers at once, a Later or a
Deferred when it must wait (pushsvc.results).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushsvc.broker.base import Broker
from pushsvc.errors import Unavailable
from pushsvc.history.replay import Recovering, Replay
from pushsvc.history.store import HistoryStore, Position, Recovery, envelope
from pushsvc.hub import NOBODY, Connection, Frame, Hub, page
from pushsvc.metrics import Metrics
from pushsvc.results import Later, gather, settle, then

log = Logger()

# (delivered now, channel, (offset, epoch) or None if not stored, why not stored)
Stored = tuple[int, str, "tuple[int, str] | None", "str | None"]


def stored_frame(channel: str, offset: int, epoch: str, payload: bytes) -> Frame:
    """A stored push: the envelope with its position, and the plain text as its twin."""
    return Frame(envelope(channel, offset, epoch, payload), channel, offset, plain=Frame(payload))


def _ignored(failure: Any) -> None:
    """An error nobody waits for: the backend was answered from local deliveries."""


def _answer(reached: int, remote: int | Later | Deferred[int]) -> int | Any:
    """Local deliveries plus the broker's count; ``ok`` at once when there were local ones."""
    if type(remote) is int:
        return reached + remote
    if reached:  # answered ok now; Redis trouble is logged by the broker
        if isinstance(remote, Deferred):
            remote.addErrback(_ignored)
        return reached
    return remote


class Node(Service):
    """This process in the cluster (of one, with the memory broker)."""

    def __init__(
        self, broker: Broker, store: HistoryStore, default_ttl: int = 0, clock: Any = reactor
    ) -> None:
        self.broker = broker
        self.store = store
        self.default_ttl = default_ttl
        self.clock = clock
        self.metrics = Metrics()
        self.hub = Hub(on_first=broker.subscribe, on_last=broker.unsubscribe)

    def startService(self) -> None:
        super().startService()
        self.broker.start(self)

    def stopService(self) -> Any:
        super().stopService()
        return self.broker.stop()

    # -- connections (the WebSocket frontend) ----------------------------------

    def attach(self, conn: Connection) -> None:
        self.hub.attach(conn)

    def identify(self, conn: Connection, uid: str, groups: Collection[str] = ()) -> bool:
        return self.hub.identify(conn, uid, groups)

    def detach(self, conn: Connection) -> None:
        self.hub.detach(conn)

    def connections_of(self, uid: str) -> int:
        return self.hub.connections_of(uid)

    def waiting_since(self) -> Any:
        """Connections that have not authenticated yet, oldest first (the auth-timeout sweep)."""
        return self.hub.waiting_since()

    def recover(
        self, conn: Recovering, uid: str, groups: Collection[str], since: dict[str, Position]
    ) -> None:
        """Replay what an identified connection missed, then let live frames through.

        Live frames are held from now until the replay is sent (pushsvc.history.replay).
        In a cluster the reads wait until this node receives the uid's pushes,
        so nothing published after the read can be missed.
        """
        wanted = [(ch, pos) for ch, pos in since.items() if self._allowed(uid, groups, ch)]
        if not wanted:
            return
        replay = Replay(conn, uid, self.broker.max_delay, self.clock)

        def read(_: object) -> Any:
            return gather([self._read(channel, pos) for channel, pos in wanted])

        ready = self.broker.subscribed(uid)
        if ready is not None:
            ready.addErrback(lambda _: None)  # not subscribed in time: the reads will say so
        done = then(
            then(ready, read), lambda recoveries: self.hub.count_sent(*replay.release(recoveries))
        )
        if isinstance(done, Deferred):
            done.addErrback(lambda f: log.failure("recovery failed", f))

    def _read(self, channel: str, pos: Position) -> Any:
        def unreadable(error: BaseException) -> Recovery:
            return Recovery(channel, False, None, None)

        return settle(self.store.read(channel, pos), lambda recovery: recovery, unreadable)

    def _allowed(self, uid: str, groups: Collection[str], channel: str) -> bool:
        """Only a connection's own channels can be replayed to it."""
        if channel.startswith("u:"):
            return channel[2:] == uid
        if channel.startswith("g:"):
            group = channel[2:]
            return group in groups or self.hub.in_group(uid, group)
        return False

    # -- delivery (the command model) ------------------------------------------

    def push(self, uids: list[str], payload: bytes) -> int | Any:
        """Send to every connection of each uid, anywhere; how many were reached.

        Answered from local deliveries at once when there are any; otherwise
        the broker's count says whether another node holds the uid.
        """
        reached = self.hub.push(uids, payload)
        remote = self.broker.publish(uids, payload, None)
        # _answer's commonest cases inline: one node's every push, a cluster's to elsewhere.
        if type(remote) is int:
            return reached + remote
        if not reached:
            return remote
        return _answer(reached, remote)

    def _push_frame(
        self, uids: list[str], payload: bytes, frame: Frame, position: tuple[str, int, str]
    ) -> int | Any:
        """A stored push: its envelope ``frame`` here, its ``position`` to the other nodes."""
        reached = self.hub.push(uids, frame)
        return _answer(reached, self.broker.publish(uids, payload, position))

    def push_groups(
        self, groups: list[str], payload: bytes, exclude: Collection[str] = NOBODY
    ) -> int | Any:
        """Send once to every connection in any of ``groups`` but those of ``exclude``."""
        return self._push_groups_frame(groups, Frame(payload), payload, exclude)

    def broadcast(self, payload: bytes, exclude: Collection[str] = NOBODY) -> int | Any:
        """Send to every authenticated connection but those of ``exclude``."""
        local = self.hub.broadcast(Frame(payload), exclude)
        fields = {"data": payload.decode("utf-8"), "exclude": sorted(exclude)}
        return _plus(local, self.broker.fan_out("broadcast", fields))

    def disconnect(self, uids: list[str], code: int, reason: str) -> int | Any:
        """Close every connection of ``uids`` (logout, ban); how many were closed."""
        closed = self.hub.disconnect(uids, code, reason)
        self.metrics.disconnects["backend"] += closed
        fields = {"uids": uids, "code": code, "reason": reason}
        return _plus(closed, self.broker.fan_out("disconnect", fields))

    def _push_groups_frame(
        self,
        groups: list[str],
        frame: Frame,
        payload: bytes,
        exclude: Collection[str],
        position: tuple[str, int, str] | None = None,
    ) -> int | Any:
        local = self.hub.push_groups(groups, frame, exclude)
        fields: dict[str, Any] = {
            "groups": groups,
            "exclude": sorted(exclude),
            "data": payload.decode("utf-8"),
        }
        if position is not None:
            fields["pos"] = list(position)
        return _plus(local, self.broker.fan_out("group", fields))

    # -- stored pushes (a ttl) -----------------------------------------------------

    def push_stored(self, uids: list[str], payload: bytes, ttl: int) -> Any:
        """Store for each uid, then deliver with positions; a list of ``Stored`` (maybe later)."""
        return gather(
            [
                self._store_one(
                    "u:" + uid,
                    payload,
                    ttl,
                    (),
                    lambda frame, pos, uid=uid: self._push_frame([uid], payload, frame, pos),
                    lambda frame, uid=uid: self.hub.push([uid], frame),
                )
                for uid in uids
            ]
        )

    def push_groups_stored(
        self, groups: list[str], payload: bytes, exclude: Collection[str], ttl: int
    ) -> Any:
        """Store for each group; a connection in several of them gets one frame per group."""
        excluded = tuple(sorted(exclude))
        return gather(
            [
                self._store_one(
                    "g:" + group,
                    payload,
                    ttl,
                    excluded,
                    lambda frame, pos, g=group: self._push_groups_frame(
                        [g], frame, payload, exclude, pos
                    ),
                    lambda frame, g=group: self.hub.push_groups([g], frame, exclude),
                )
                for group in groups
            ]
        )

    def _store_one(
        self,
        channel: str,
        payload: bytes,
        ttl: int,
        excluded: tuple[str, ...],
        route: Callable[[Frame, tuple[str, int, str]], Any],
        local: Callable[[Frame], int],
    ) -> Any:
        """Append to the channel's stream, then route the frame with its position.

        If the store cannot take it (Redis down), this node's connections still
        get the plain text, and the answer says it was not stored.
        """

        def stored(pos: tuple[int, str]) -> Any:
            offset, epoch = pos
            frame = stored_frame(channel, offset, epoch, payload)
            sent = route(frame, (channel, offset, epoch))
            # Stored but not delivered now (Redis failed in between): still queued.
            return settle(
                sent, lambda n: (n, channel, pos, None), lambda e: _queued(e, channel, pos)
            )

        def unstored(error: BaseException) -> Stored:
            if not isinstance(error, Unavailable):
                raise error
            return local(Frame(payload)), channel, None, error.reason

        return settle(self.store.append(channel, payload, ttl, excluded), stored, unstored)

    # -- the broker's handler: what other nodes send ------------------------------

    def deliver_uid(self, uid: str, payload: bytes, position: tuple[str, int, str] | None) -> int:
        frame = Frame(payload) if position is None else stored_frame(*position, payload)
        return self.hub.push([uid], frame)

    def act(self, kind: str, fields: dict[str, Any]) -> int:
        exclude = frozenset(fields.get("exclude", ())) or NOBODY
        if kind == "disconnect":
            closed = self.hub.disconnect(fields["uids"], fields["code"], fields["reason"])
            self.metrics.disconnects["backend"] += closed
            return closed
        payload = fields["data"].encode("utf-8")
        if kind == "broadcast":
            return self.hub.broadcast(Frame(payload), exclude)
        if kind == "group":
            pos = fields.get("pos")
            frame = Frame(payload) if pos is None else stored_frame(*pos, payload)
            return self.hub.push_groups(fields["groups"], frame, exclude)
        return 0

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> None:
        (self.hub.join if kind == "join" else self.hub.leave)(uids, groups)

    def adopt_memberships(self, groups: dict[str, set[str]]) -> None:
        self.hub.replace_joined(groups)

    def local_uids(self) -> Collection[str]:
        return self.hub.online_uids()

    def local_counts(self) -> dict[str, int]:
        return self.hub.counts()

    # -- groups and presence (the command model) ------------------------------------

    def join(self, uids: list[str], groups: list[str]) -> Any:
        """Put uids in groups, for their current and future connections."""
        self.hub.join(uids, groups)
        return self.broker.membership("join", uids, groups)

    def leave(self, uids: list[str], groups: list[str]) -> Any:
        """Take uids out of groups."""
        self.hub.leave(uids, groups)
        return self.broker.membership("leave", uids, groups)

    def members(self, group: str) -> set[str]:
        """A group's uids (memberships are replicated to every node, so this one knows)."""
        return self.hub.members(group)

    def online(self, uids: list[str]) -> dict[str, bool] | Any:
        """Which of ``uids`` have a live connection anywhere."""
        local = {uid: self.hub.connections_of(uid) > 0 for uid in uids}
        elsewhere = [uid for uid, here in local.items() if not here]
        if not elsewhere:
            return local
        return then(self.broker.online(elsewhere), lambda remote: {**local, **remote})

    def counts(self) -> dict[str, int] | Any:
        """Online uids, connections, pending connections and groups (and nodes, in a cluster)."""
        return self.broker.counts(self.hub.counts(), self.hub.online_uids())

    def list_online(self, after: str | None, limit: int) -> Any:
        """A page of online uids, the cursor for the next page, and how many there are."""

        def paged(uids: Collection[str]) -> tuple[list[str], str | None, int]:
            chunk, next_after = page(uids, after, limit)
            return chunk, next_after, len(uids)

        return then(self.broker.list_online(self.hub.online_uids()), paged)


def _plus(local: int, remote: int | Any) -> int | Any:
    """Local and remote counts together; with Redis down, what was done here if anything."""
    if type(remote) is int:
        return local + remote
    remote.addCallback(lambda n: local + n)
    if local:
        remote.addErrback(lambda f: (f.trap(Unavailable), local)[1])
    return remote


def _queued(error: BaseException, channel: str, pos: tuple[int, str]) -> Stored:
    if not isinstance(error, Unavailable):
        raise error
    return 0, channel, pos, None
