"""One log line per kind and interval for events that peers can cause in bulk.

A flood of bad handshakes, dropped connections or stale cluster messages must
not become a flood of log lines: the first event of a kind is logged at once,
later ones within ``interval`` are counted, and the next line says how many
were suppressed.
"""

from __future__ import annotations

import time
import unicodedata
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


PEER_TEXT_LIMIT = 100  # characters of peer text in a log line or close reason


def _escape(char: str) -> str:
    """``char`` as is, or as a visible escape if it could hide or forge text in a log."""
    if char == "\\":
        return "\\\\"
    # Cc: controls (newlines, ESC); Cf: format (bidi overrides, zero-width);
    # Zl/Zp: line and paragraph separators; Cs/Co/Cn: surrogates, private, unassigned.
    if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def peer_text(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text a peer sent, safe to log or echo in a close reason: escaped and bounded.

    No control, newline, bidi or other format character survives (each
    becomes a visible ``\\xNN``/``\\uNNNN`` escape), and at most ``limit``
    characters come out (the last one ``…`` when cut).
    """
    out = "".join(_escape(c) for c in text[: limit * 2])
    if len(out) > limit or len(text) > limit * 2:
        return out[: limit - 1] + "…"
    return out


def close_reason(text: str) -> str:
    """A WebSocket close reason from ``text``: peer-safe and within the 123 bytes a frame allows."""
    reason = peer_text(text)
    while len(reason.encode("utf-8")) > 123:
        reason = reason[:-2] + "…"
    return reason
