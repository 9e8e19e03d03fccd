"""Shutdown without a stampede: close every WebSocket with 1001, spread over a window.

On SIGTERM twistd stops the services; this one tells every browser to go
away, in random order and in batches over ``--drain-window`` seconds, so
that they do not all reconnect to the next node in the same instant, then
waits up to ``--drain-timeout`` more seconds for their close handshakes.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from pushsvc.hub import Connection, Hub

log = Logger()

STEP = 0.05  # seconds between batches of 1001 closes


class Drain(Service):
    """Holds shutdown until the hub's connections are gone, or the timeout."""

    def __init__(
        self, hub: Hub, window: float = 0.0, timeout: float = 5.0, clock: Any = reactor
    ) -> None:
        self.hub = hub
        self.window = window
        self.timeout = timeout
        self.clock = clock

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        conns = self.hub.everyone()
        if not conns:
            return None
        log.info(
            "closing {count} WebSocket connection(s) with 1001 over {window} s",
            count=len(conns),
            window=self.window,
        )
        random.shuffle(conns)
        steps = max(1, round(self.window / STEP))
        batches = [
            conns[i * len(conns) // steps : (i + 1) * len(conns) // steps] for i in range(steps)
        ]
        calls = [
            self.clock.callLater(i * self.window / steps, self._go_away, batch)
            for i, batch in enumerate(batches)
            if i and batch
        ]
        done = self.hub.when_empty()
        timer = self.clock.callLater(self.window + self.timeout, self._give_up, done)
        self._go_away(batches[0])

        def finished(result: None) -> None:
            for call in [*calls, timer]:
                if call.active():
                    call.cancel()

        return done.addCallback(finished)

    def _go_away(self, conns: list[Connection]) -> None:
        for conn in conns:
            if not self.hub.is_attached(conn):
                continue  # closed on its own meanwhile
            try:
                conn.go_away()
            except Exception:
                log.failure("closing a connection failed")

    def _give_up(self, done: defer.Deferred[None]) -> None:
        if not done.called:
            left = len(self.hub.everyone())
            log.warn("drain timeout: {left} connection(s) still open", left=left)
            done.callback(None)
