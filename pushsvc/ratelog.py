"""One log line per kind and interval for events that peers can cause in bulk.

A flood of bad handshakes, dropped connections or stale cluster messages must
not become a flood of log lines: the first event of a kind is logged at once,
later ones within ``interval`` are counted, and the next line says how many
were suppressed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.logger import Logger, LogLevel


class RateLimitedLog:
    """Logs at most one line per kind every ``interval`` seconds, with the suppressed count."""

    def __init__(
        self,
        logger: Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        level: LogLevel = LogLevel.info,
    ) -> None:
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._level = level
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, kind: str, message: str, **fields: object) -> bool:
        """Log ``message`` unless a line of this ``kind`` went out within the interval.

        True if it was logged.  ``message`` may use ``{suppressed}``: how many
        events of this kind were only counted since the previous line.
        """
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._next[kind] = now + self.interval
        suppressed = self._suppressed.pop(kind, 0)
        self._log.emit(self._level, message, suppressed=suppressed, **fields)
        return True
