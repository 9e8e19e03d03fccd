"""The memory history store, the recovery rule and the hello, without sockets."""

from __future__ import annotations

import json

import pytest

from pushsvc.errors import AuthError
from pushsvc.history.store import MemoryStore
from pushsvc.websocket import parse_hello


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_offsets_grow_and_a_client_gets_what_it_missed(clock) -> None:
    store = MemoryStore(size=10, clock=clock)
    positions = [store.append("u:a", b"m%d" % i, 60) for i in range(1, 4)]
    epoch = positions[0][1]
    assert positions == [(1, epoch), (2, epoch), (3, epoch)]
    got = store.read("u:a", (1, epoch))
    assert (got.recovered, got.offset, got.epoch) == (True, 3, epoch)
    assert [(off, data) for off, data, _ in got.entries] == [(2, b"m2"), (3, b"m3")]
    # Up to date: nothing to replay, and that is a success.
    assert store.read("u:a", (3, epoch)).recovered and not store.read("u:a", (3, epoch)).entries


def test_a_client_that_never_saw_an_epoch_gets_everything_kept(clock) -> None:
    store = MemoryStore(size=10, clock=clock)
    assert store.read("u:new", (0, None)).recovered  # no stream yet: nothing missed
    store.append("u:new", b"x", 60)
    got = store.read("u:new", (0, None))
    assert got.recovered and [e[1] for e in got.entries] == [b"x"]


@pytest.mark.parametrize("since", [(0, None), (1, "e")])
def test_overflow_is_a_failed_recovery_never_a_partial_one(clock, since) -> None:
    store = MemoryStore(size=3, clock=clock)
    for i in range(5):
        _, epoch = store.append("u:a", b"%d" % i, 60)
    since = (since[0], epoch if since[1] else None)
    got = store.read("u:a", since)
    assert (got.recovered, got.entries, got.offset) == (False, [], 5)
    assert store.read("u:a", (2, epoch)).recovered  # the last three are still whole


def test_expiry_and_epoch_changes_fail(clock) -> None:
    store = MemoryStore(size=10, idle=100, clock=clock)
    store.append("u:a", b"long", 60)
    _, epoch = store.append("u:a", b"short", 1)
    clock.now += 2
    assert not store.read("u:a", (0, epoch)).recovered  # the second one expired
    assert store.read("u:a", (2, epoch)).recovered
    assert not store.read("u:a", (2, "other")).recovered
    assert not store.read("u:a", (9, epoch)).recovered  # ahead of the stream: not ours
    # Once everything expired and the stream stayed idle, it is dropped: a new epoch.
    clock.now += 60 + 100
    store.sweep()
    assert "u:a" not in store.streams
    assert not store.read("u:a", (2, epoch)).recovered
    off, new_epoch = store.append("u:a", b"again", 60)
    assert off == 1 and new_epoch != epoch


def test_an_expired_push_is_reported_not_replayed(clock) -> None:
    """What a client reconnecting after a push's ttl gets: the failed status, no entries."""
    store = MemoryStore(size=10, clock=clock)
    _, epoch = store.append("u:short", b"gone soon", 1)
    assert store.read("u:short", (0, epoch)).entries  # kept within its ttl
    clock.now += 1
    got = store.read("u:short", (0, epoch))
    assert (got.recovered, got.offset, got.entries) == (False, 1, [])
    assert json.loads(got.status()) == {
        "pushsvc": "recovery",
        "ch": "u:short",
        "recovered": False,
        "off": 1,
        "ep": epoch,
    }


def test_sweep_keeps_streams_that_are_in_use(clock) -> None:
    store = MemoryStore(size=10, idle=100, clock=clock)
    store.append("u:a", b"x", 60)
    clock.now += 30
    store.sweep()
    assert "u:a" in store.streams


def test_hello_parsing() -> None:
    assert parse_hello("uid1") == ("uid1", None)
    assert parse_hello('{"other":1}') == ('{"other":1}', None)  # not a hello: a uid, as before
    assert parse_hello('{"uid":"u1"}') == ("u1", {})  # a hello: envelopes, no replay
    assert parse_hello('{"token":"t","since":{"u:u1":[3,"ep"],"g:r":[0,null]}}') == (
        "t",
        {"u:u1": (3, "ep"), "g:r": (0, None)},
    )
    for bad in ('{"uid":1}', '{"uid":"u","since":[]}', '{"uid":"u","since":{"u:u":[-1,null]}}'):
        with pytest.raises(AuthError) as info:
            parse_hello(bad)
        assert info.value.code == 4000
