"""The garbage collector's schedule for a long-lived server: full collections on a timer.

CPython's automatic full (generation 2) collection runs whenever the
objects promoted since the last one exceed a quarter of the old heap, and
each one walks every tracked object: all connections held.  During a
connect storm that made set-up cost grow with the number of connections
held (docs/performance.md, "Connection set-up": 0 µs of full collections per
new connection at 2,000 held, 90 µs at 10,000).  Here the young
generations are collected as usual, the start-up heap (modules, classes:
never garbage) is frozen out of every collection, and full collections run
every ``interval`` seconds instead: the same pause, once a minute rather
than every few thousand connections.  Cycles between full collections wait
for the next one; nothing in pushsvc relies on them being freed sooner.
"""

from __future__ import annotations

import gc

from twisted.application.internet import TimerService
from twisted.application.service import Service

# Python's own thresholds for generations 0 and 1; generation 2 never on its own.
YOUNG = (700, 10)
NEVER = 1 << 30


def collect_old() -> int:
    """One full collection (what CPython would otherwise start on its own)."""
    return gc.collect()


class FullCollections(TimerService):
    """Freeze the start-up heap, then collect generation 2 every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(interval, collect_old)
        self._saved: tuple[int, ...] | None = None

    def startService(self) -> None:
        """Called once the other services started: what exists now lives as long as the process."""
        gc.collect()
        gc.freeze()
        self._saved = gc.get_threshold()
        gc.set_threshold(*YOUNG, NEVER)
        super().startService()

    def stopService(self) -> object:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
        gc.unfreeze()
        return super().stopService()


def full_collections(interval: float) -> Service:
    """The service for ``--gc-interval``."""
    return FullCollections(interval)
