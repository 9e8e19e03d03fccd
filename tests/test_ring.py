"""The hash ring places keys exactly where txredisapi's HashRing did (upgrades keep data put)."""

from __future__ import annotations

import zlib

import pytest

from pushsvc.broker.ring import hash_ring

txredisapi = pytest.importorskip("txredisapi", reason="the reference ring (pip install txredisapi)")


class _Node:
    """What txredisapi's HashRing reads of a node: ``_factory.uuid``."""

    def __init__(self, name: str) -> None:
        self._factory = type("Factory", (), {"uuid": name})()
        self.name = name


@pytest.mark.parametrize(
    "names",
    [
        ["127.0.0.1:6379"],
        ["10.0.0.9:6379", "10.0.0.10:6379"],
        ["a:1", "b:2", "c:3", "d:4", "sentinel:mymaster"],
    ],
)
def test_keys_land_where_txredisapi_put_them(names: list[str]) -> None:
    ours = hash_ring([(name, name) for name in names])
    theirs = txredisapi.HashRing([_Node(name) for name in names])
    keys = [f"uid-{i}".encode() for i in range(20000)] + [b"", b"\xff" * 8, b"pushsvc:u:x"]
    moved = [k for k in keys if ours(k) != theirs.get_node(k).name]
    assert not moved, f"{len(moved)} keys placed differently, e.g. {moved[:3]}"


def test_keys_past_the_last_point_go_to_the_last_point_not_round() -> None:
    """txredisapi clamps instead of wrapping; a key hashing past every point shows it."""
    names = ["x:1", "y:2"]
    ours = hash_ring([(name, name) for name in names])
    theirs = txredisapi.HashRing([_Node(name) for name in names])
    top = max(theirs.sorted_keys)
    key = next(f"k{i}".encode() for i in range(10**7) if zlib.crc32(f"k{i}".encode()) > top)
    assert ours(key) == theirs.get_node(key).name == theirs.ring[top].name
