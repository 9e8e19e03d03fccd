"""The hub and the drain in-process: fake connections, and a Clock instead of time.

The hub is this process's index of connections (pushsvc/hub.py); until now
only end-to-end tests through twistd reached it.  A fake connection records
what the hub and the drain do to it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pushsvc.drain import STEP, Drain
from pushsvc.hub import Frame, Hub, page


class FakeConn:
    """A connection that records the frames, closes and 1001s it gets."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.frames: list[Frame] = []
        self.closes: list[tuple[int, str]] = []
        self.went_away = 0

    def deliver(self, frame: Frame) -> bool:
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def go_away(self) -> None:
        self.went_away += 1

    def __repr__(self) -> str:
        return f"FakeConn({self.name!r})"


class Events:
    """The hub's on_first / on_last calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def first(self, uid: str) -> None:
        self.calls.append(("first", uid))

    def last(self, uid: str) -> None:
        self.calls.append(("last", uid))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def hub(events: Events) -> Hub:
    return Hub(on_first=events.first, on_last=events.last)


def online(hub: Hub, uid: str, groups: tuple[str, ...] = ()) -> FakeConn:
    """A connection attached and identified as ``uid`` (with token ``groups``)."""
    conn = FakeConn(uid)
    hub.attach(conn)
    assert hub.identify(conn, uid, groups)
    return conn


FRAME = Frame(b"hello")


# -- lifecycle -------------------------------------------------------------------


def test_attach_identify_detach_and_counts(hub: Hub) -> None:
    conn = FakeConn()
    hub.attach(conn)
    assert hub.counts() == {"uids": 0, "connections": 0, "pending": 1, "groups": 0}
    assert hub.is_attached(conn)
    assert hub.identify(conn, "ann")
    assert hub.counts() == {"uids": 1, "connections": 1, "pending": 0, "groups": 0}
    assert hub.connections_of("ann") == 1 and set(hub.online_uids()) == {"ann"}
    hub.detach(conn)
    assert hub.counts() == {"uids": 0, "connections": 0, "pending": 0, "groups": 0}
    assert not hub.is_attached(conn) and hub.connections_of("ann") == 0
    hub.detach(conn)  # twice, or never attached: nothing happens
    hub.detach(FakeConn())


def test_identify_only_what_is_attached_and_only_once(hub: Hub, events: Events) -> None:
    stranger = FakeConn()
    assert not hub.identify(stranger, "ann")  # closed before it authenticated
    assert hub.counts()["uids"] == 0 and events.calls == []
    conn = online(hub, "ann")
    assert not hub.identify(conn, "bob")  # already identified
    assert hub.connections_of("ann") == 1 and hub.connections_of("bob") == 0


def test_first_and_last_fire_once_per_uid(hub: Hub, events: Events) -> None:
    a1 = online(hub, "ann")
    a2 = online(hub, "ann")
    b1 = online(hub, "bob")
    assert events.calls == [("first", "ann"), ("first", "bob")]
    hub.detach(a1)
    assert events.calls[-1] == ("first", "bob")  # ann still has a connection
    hub.detach(a2)
    hub.detach(a2)
    assert events.calls[2:] == [("last", "ann")]
    online(hub, "ann")  # back: a first connection again
    hub.detach(b1)
    assert events.calls[3:] == [("first", "ann"), ("last", "bob")]


def test_a_pending_connection_gets_no_events_and_no_pushes(hub: Hub, events: Events) -> None:
    pending = FakeConn()
    hub.attach(pending)
    assert hub.push(["ann"], FRAME) == 0
    assert hub.broadcast(FRAME) == 0
    hub.detach(pending)
    assert events.calls == [] and pending.frames == []


def test_waiting_since_lists_unauthenticated_connections_oldest_first() -> None:
    now = [100.0]
    hub = Hub(clock=lambda: now[0])
    old, new, done = FakeConn("old"), FakeConn("new"), FakeConn("done")
    hub.attach(old)
    now[0] = 105.0
    hub.attach(new)
    hub.attach(done)
    hub.identify(done, "ann")
    assert list(hub.waiting_since()) == [(old, 100.0), (new, 105.0)]
    assert hub.everyone() == [old, new, done]  # pending ones first


def test_when_empty_fires_at_once_or_with_the_last_detach(hub: Hub) -> None:
    assert hub.when_empty().called
    a = online(hub, "ann")
    pending = FakeConn()
    hub.attach(pending)
    waiters = [hub.when_empty(), hub.when_empty()]
    hub.detach(a)
    assert not any(d.called for d in waiters)  # a pending connection is still there
    hub.detach(pending)
    assert all(d.called for d in waiters)


# -- delivery ---------------------------------------------------------------------


def test_push_reaches_every_connection_of_each_uid(hub: Hub) -> None:
    a1, a2, b, c = online(hub, "ann"), online(hub, "ann"), online(hub, "bob"), online(hub, "cy")
    assert hub.push(["ann", "bob", "nobody"], FRAME) == 3
    assert [len(x.frames) for x in (a1, a2, b, c)] == [1, 1, 1, 0]
    assert a1.frames[0] is FRAME  # one frame shared by every connection


def test_broadcast_reaches_everyone_but_the_excluded(hub: Hub) -> None:
    a1, a2, b = online(hub, "ann"), online(hub, "ann"), online(hub, "bob")
    assert hub.broadcast(FRAME) == 3
    assert hub.broadcast(Frame(b"2"), exclude={"ann"}) == 1
    assert [len(x.frames) for x in (a1, a2, b)] == [1, 1, 2]


def test_disconnect_closes_every_connection_of_the_uids(hub: Hub) -> None:
    a1, a2, b = online(hub, "ann"), online(hub, "ann"), online(hub, "bob")
    assert hub.disconnect(["ann", "nobody"], 4009, "bye") == 2
    assert a1.closes == a2.closes == [(4009, "bye")] and b.closes == []
    # Closing is asked, not done: they stay until their close handshake detaches them.
    assert hub.connections_of("ann") == 2


# -- groups ----------------------------------------------------------------------


def test_a_joined_uid_covers_its_future_connections(hub: Hub) -> None:
    hub.join(["ann"], ["room"])
    assert hub.push_groups(["room"], FRAME) == 0  # nobody online yet
    a1, a2 = online(hub, "ann"), online(hub, "ann")
    assert hub.push_groups(["room"], FRAME) == 2
    assert len(a1.frames) == len(a2.frames) == 1
    hub.detach(a1)
    hub.detach(a2)
    assert hub.members("room") == {"ann"}  # the membership outlives the connections
    assert hub.in_group("ann", "room")


def test_token_groups_belong_to_one_connection(hub: Hub) -> None:
    with_token = online(hub, "ann", groups=("vip",))
    other = online(hub, "ann")
    assert hub.members("vip") == {"ann"}
    assert not hub.in_group("ann", "vip")  # in_group is for backend joins only
    assert hub.push_groups(["vip"], FRAME) == 1
    assert (len(with_token.frames), len(other.frames)) == (1, 0)
    assert hub.group_count() == 1
    hub.detach(with_token)
    assert hub.members("vip") == set() and hub.group_count() == 0


def test_leave_removes_joins_but_not_token_groups(hub: Hub) -> None:
    online(hub, "ann", groups=("room",))
    hub.join(["ann", "bob"], ["room", "hall"])
    hub.leave(["ann"], ["room"])
    assert hub.members("room") == {"ann", "bob"}  # ann's token still puts her in
    assert not hub.in_group("ann", "room") and hub.in_group("bob", "room")
    hub.leave(["bob"], ["room", "unknown"])
    hub.leave(["ann", "bob"], ["hall"])
    assert hub.members("hall") == set()
    assert hub.group_count() == 1  # only the token group is left


def test_replace_joined_adopts_the_clusters_memberships(hub: Hub) -> None:
    online(hub, "ann", groups=("vip",))
    hub.join(["old"], ["stale"])
    groups = {"room": {"ann", "bob"}, "empty": set()}
    hub.replace_joined(groups)
    groups["room"].add("later")  # the hub keeps its own copy
    assert hub.members("stale") == set()
    assert hub.members("room") == {"ann", "bob"}
    assert hub.members("empty") == set()
    assert hub.members("vip") == {"ann"}  # token memberships are not the cluster's
    assert hub.group_count() == 2


def test_one_frame_per_connection_however_many_targeted_groups_hold_it(hub: Hub) -> None:
    both = online(hub, "ann", groups=("b",))
    hub.join(["ann"], ["a", "b"])
    bob = online(hub, "bob", groups=("a", "b"))
    assert hub.push_groups(["a", "b", "none"], FRAME) == 2
    assert len(both.frames) == len(bob.frames) == 1


def test_push_groups_excludes_joined_and_token_members(hub: Hub) -> None:
    ann = online(hub, "ann")
    hub.join(["ann", "cy"], ["room"])
    bob = online(hub, "bob", groups=("room",))
    cy = online(hub, "cy")
    assert hub.push_groups(["room"], FRAME, exclude={"ann", "bob"}) == 1
    assert (len(ann.frames), len(bob.frames), len(cy.frames)) == (0, 0, 1)


def test_counts_include_both_kinds_of_group_once(hub: Hub) -> None:
    online(hub, "ann", groups=("room", "vip"))
    hub.join(["bob"], ["room", "hall"])
    assert hub.counts() == {"uids": 1, "connections": 1, "pending": 0, "groups": 3}


# -- page ---------------------------------------------------------------------------


def test_page_walks_sorted_uids_with_a_cursor() -> None:
    uids = {"e", "a", "d", "b", "c"}
    assert page(uids, None, 2) == (["a", "b"], "b")
    assert page(uids, "b", 2) == (["c", "d"], "d")
    assert page(uids, "d", 2) == (["e"], None)
    assert page(uids, None, 5) == (["a", "b", "c", "d", "e"], None)  # exactly full: no next
    assert page(uids, "bb", 10) == (["c", "d", "e"], None)  # a cursor need not be a uid
    assert page(set(), None, 3) == ([], None)


# -- drain ---------------------------------------------------------------------------


def draining(hub: Hub, count: int, window: float, timeout: float) -> tuple[Clock, Drain, Any]:
    """``count`` identified connections and a Drain stopped on a Clock: (clock, drain, result)."""
    for i in range(count):
        online(hub, f"u{i}")
    clock = Clock()
    drain = Drain(hub, window=window, timeout=timeout, clock=clock)
    drain.startService()
    return clock, drain, drain.stopService()


def went_away(hub: Hub) -> int:
    return sum(conn.went_away for conn in hub.everyone())  # type: ignore[attr-defined]


def at(clock: Clock, when: float) -> None:
    """Move the clock to exactly ``when`` (summing steps would drift past a call's time)."""
    clock.rightNow = when
    clock.advance(0)


def test_drain_with_no_connection_does_not_wait(hub: Hub) -> None:
    drain = Drain(hub, window=1, timeout=1, clock=Clock())
    drain.startService()
    assert drain.stopService() is None


def test_drain_closes_in_batches_spread_over_the_window(hub: Hub) -> None:
    clock, _, done = draining(hub, 40, window=1.0, timeout=2.0)
    steps = round(1.0 / STEP)
    per_step = [went_away(hub)]
    for i in range(1, steps):
        at(clock, i * 1.0 / steps)
        per_step.append(went_away(hub) - sum(per_step))
    assert per_step == [2] * steps
    assert all(conn.went_away == 1 for conn in hub.everyone())  # type: ignore[attr-defined]
    assert not done.called  # nobody answered yet


def test_drain_closes_pending_connections_too(hub: Hub) -> None:
    pending = FakeConn()
    hub.attach(pending)
    _, _, done = draining(hub, 0, window=0, timeout=1)
    assert pending.went_away == 1
    hub.detach(pending)
    assert done.called


def test_drain_skips_connections_that_closed_on_their_own(hub: Hub) -> None:
    clock, _, done = draining(hub, 20, window=1.0, timeout=1.0)
    conns = hub.everyone()
    waiting = [c for c in conns if not c.went_away]  # type: ignore[attr-defined]
    assert waiting
    for conn in waiting:
        hub.detach(conn)
    at(clock, 1.0)
    assert all(c.went_away == 0 for c in waiting)  # type: ignore[attr-defined]


def test_drain_finishes_as_soon_as_the_hub_is_empty(hub: Hub) -> None:
    clock, _, done = draining(hub, 40, window=1.0, timeout=5.0)
    fired: list[None] = []
    done.addCallback(fired.append)
    at(clock, 0.5)
    for conn in hub.everyone():
        hub.detach(conn)  # every close handshake completes
    assert fired == [None]
    assert clock.getDelayedCalls() == []  # later batches and the give-up timer: cancelled


def test_drain_gives_up_after_window_and_timeout_and_fires_once(hub: Hub) -> None:
    clock, _, done = draining(hub, 10, window=1.0, timeout=2.0)
    fired: list[None] = []
    done.addCallback(fired.append)
    at(clock, 2.999)
    assert fired == []
    at(clock, 3.0)
    assert fired == [None]
    assert went_away(hub) == 10
    for conn in hub.everyone():  # the stragglers go later: nothing fires again
        hub.detach(conn)
    assert fired == [None]
    assert isinstance(done, defer.Deferred) and clock.getDelayedCalls() == []


def test_a_failing_close_does_not_stop_the_drain(hub: Hub) -> None:
    class Broken(FakeConn):
        def go_away(self) -> None:
            super().go_away()
            raise RuntimeError("transport gone")

    broken = Broken("broken")
    hub.attach(broken)
    hub.identify(broken, "broken")
    _, _, done = draining(hub, 3, window=0, timeout=1)
    assert broken.went_away == 1 and went_away(hub) == 4
