"""Recovery without a gap or a duplicate: hold live frames, replay, then release.

While a connection's missed messages are read, new pushes to it keep
arriving.  A ``Replay`` is the connection's gate for that time: it holds the
live frames, sends the replay and the recovery status, then the held frames
the replay did not cover.  In a cluster a message stored just before the
read may still be on its way from the node that stored it, so for
``late_window`` seconds more the gate keeps dropping frames whose position
the replay covered.  Positions travel on the frames; nothing is parsed.
"""

from __future__ import annotations

from typing import Any, Protocol

from pushsvc.history.store import Recovery, envelope
from pushsvc.hub import Frame


class Recovering(Protocol):
    """What a Replay needs from a connection."""

    def send_frame(self, frame: Frame) -> None:
        """Write a frame now, past the gate."""

    def set_gate(self, gate: Replay | None) -> None:
        """Route every delivered frame through ``gate.offer`` (None: straight out)."""


class Replay:
    """A connection's gate while it recovers, and shortly after."""

    def __init__(self, conn: Recovering, uid: str, late_window: float, clock: Any) -> None:
        self.conn = conn
        self.uid = uid
        self.late_window = late_window
        self.clock = clock
        self.held: list[Frame] | None = []
        self.covered: dict[str, int] = {}
        conn.set_gate(self)

    def offer(self, frame: Frame) -> None:
        """A live frame for the connection: held, dropped as covered, or sent."""
        if self.held is not None:
            self.held.append(frame)
        elif self._fresh(frame):
            self.conn.send_frame(frame)

    def _fresh(self, frame: Frame) -> bool:
        channel = frame.channel
        return channel is None or frame.offset > self.covered.get(channel, -1)

    def release(self, recoveries: list[Recovery]) -> tuple[int, int]:
        """Send the replay, the statuses, then the held frames not covered; (frames, bytes)."""
        frames = size = 0
        for recovery in recoveries:
            for off, payload, excluded in recovery.entries:
                if self.uid not in excluded:
                    data = envelope(recovery.channel, off, recovery.epoch or "", payload)
                    self.conn.send_frame(Frame(data, recovery.channel, off))
                    frames += 1
                    size += len(data)
            self.conn.send_frame(Frame(recovery.status()))
            if recovery.offset is not None:
                self.covered[recovery.channel] = recovery.offset
        held, self.held = self.held or [], None
        for frame in held:
            if self._fresh(frame):
                self.conn.send_frame(frame)
        if self.late_window > 0:
            self.clock.callLater(self.late_window, self._done)
        else:
            self._done()
        return frames, size

    def _done(self) -> None:
        self.conn.set_gate(None)
