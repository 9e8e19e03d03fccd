"""The Broker interface: what a node needs from the other nodes, and what they tell it.

Modelled on Centrifuge's ``broker.go``.  The node calls a ``Broker``; the
broker calls back through the ``BrokerHandler`` the node gives it, so a
broker never imports the node.  Two implementations: ``memory`` (one node:
nobody else, answered at once) and ``redis`` (a cluster through Redis
pub/sub, answered with Deferreds).

Every method that returns ``X | Deferred[X]`` answers synchronously when it
can; callers go through :func:`pushsvc.results.then`.  A Deferred fails with
:class:`pushsvc.errors.Unavailable` when the answer would be a guess.
``publish``, on every cluster push's path, answers with a
:class:`pushsvc.results.Later` instead (a Deferred's bookkeeping was a
quarter of a cluster push's cost), which fails the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from pushsvc.results import Later


class BrokerHandler(Protocol):
    """The node, as a broker sees it."""

    def deliver_uid(self, uid: str, payload: bytes, position: tuple[str, int, str] | None) -> int:
        """Another node pushed to ``uid``: deliver to this node's connections of it.

        ``position`` is the (channel, offset, epoch) of a stored push, None for a plain one.
        """

    def act(self, kind: str, fields: dict[str, Any]) -> int:
        """Another node asked every node to broadcast, push to groups or disconnect."""

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> None:
        """Another node joined (``kind`` "join") or removed uids from groups."""

    def adopt_memberships(self, groups: dict[str, set[str]]) -> None:
        """The cluster's stored memberships, after a (re)connect."""

    def local_uids(self) -> Collection[str]:
        """Uids with a connection on this node (to subscribe to again after a reconnect)."""

    def local_counts(self) -> dict[str, int]:
        """This node's counts, for its presence record."""


class Broker(Protocol):
    """How a node reaches the connections of the other nodes."""

    # Seconds a published message may take to reach another node: how long a
    # recovered connection keeps dropping frames its replay already covered.
    max_delay: float
    # Messages from other nodes dropped as too old to deliver (overload).
    stale_messages: int

    def start(self, handler: BrokerHandler) -> None: ...

    def stop(self) -> Deferred[Any] | None: ...

    def subscribe(self, uid: str) -> None:
        """This node now holds ``uid``: receive pushes to it from other nodes."""

    def unsubscribe(self, uid: str) -> None: ...

    def subscribed(self, uid: str) -> Deferred[None] | None:
        """Fires once pushes to ``uid`` from other nodes reach this one (None: already)."""

    def publish(
        self, uids: Iterable[str], payload: bytes, position: tuple[str, int, str] | None = None
    ) -> int | Later:
        """Send to other nodes' connections of ``uids``; how many nodes received it."""

    def fan_out(self, kind: str, fields: dict[str, Any]) -> int | Deferred[int]:
        """Ask every other node to ``act``; the sum of what they did."""

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> None | Deferred[None]:
        """Store a join or leave for the cluster and tell every node."""

    def online(self, uids: list[str]) -> dict[str, bool] | Deferred[dict[str, bool]]:
        """Which of ``uids`` (offline here) are online on another node."""

    def counts(self, local: dict[str, int], uids: Collection[str]) -> Any:
        """Cluster-wide counts from this node's ``local`` ones and its ``uids``."""

    def list_online(self, uids: Collection[str]) -> set[str] | Deferred[set[str]] | Collection[str]:
        """Every online uid, given this node's ``uids``."""
