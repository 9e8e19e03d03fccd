"""The broker of a single node: there is nobody else, and it says so at once.

No Deferred on any path, so one node's push costs what it did before the
Broker interface existed, while running the same node code as a cluster.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from pushsvc.broker.base import BrokerHandler


class MemoryBroker:
    """A one-node cluster: zero remote receivers, zero remote counts."""

    max_delay = 0.0
    stale_messages = 0

    def start(self, handler: BrokerHandler) -> None:
        pass

    def stop(self) -> None:
        return None

    def subscribe(self, uid: str) -> None:
        pass

    def unsubscribe(self, uid: str) -> None:
        pass

    def subscribed(self, uid: str) -> None:
        return None

    def publish(
        self, uids: Iterable[str], payload: bytes, position: tuple[str, int, str] | None = None
    ) -> int:
        return 0

    def fan_out(self, kind: str, fields: dict[str, Any]) -> int:
        return 0

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> None:
        return None

    def online(self, uids: list[str]) -> dict[str, bool]:
        return {}

    def counts(self, local: dict[str, int], uids: Collection[str]) -> dict[str, int]:
        return local

    def list_online(self, uids: Collection[str]) -> Collection[str]:
        return uids
