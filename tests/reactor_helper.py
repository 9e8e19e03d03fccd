"""The global reactor, in-process under pytest, for code that talks to a real Redis.

pytest runs a ``twisted.trial.unittest.TestCase`` through trial's own
``run()``, so a test method that returns a Deferred is awaited: trial runs
the reactor until the Deferred fires (failing the test after ``timeout``
seconds), then fails the test if it left delayed calls or sockets in the
reactor, and stops the reactor's thread pool after each test.  That is the
isolation these tests need, with nothing installed beyond Twisted.

``ReactorTestCase`` adds one thing: trial's ``reactor.run()`` installs the
reactor's SIGINT and SIGTERM handlers and never removes them, which would
leave Ctrl-C dead for the rest of the pytest run; they are put back after
each test.  ``until`` is the bounded poll for states that no Deferred
announces (a Redis connection noticed down, a node's message received).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from redis_server import RedisServer, require_redis
from twisted.internet import defer, reactor, task
from twisted.internet.base import DelayedCall
from twisted.trial import unittest

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ReactorTestCase(unittest.TestCase):
    """A trial TestCase run by pytest, leaving the process's signal handlers as it found them."""

    timeout = 20  # seconds before trial fails a test whose Deferred never fires

    def run(self, result: object) -> None:  # type: ignore[override]
        saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
        try:
            super().run(result)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01
) -> defer.Deferred[None]:
    """Fires once ``predicate()`` is true, polling the running reactor; fails after ``timeout``.

    For states nothing else announces; the bound makes a state that never
    comes a failure instead of a hang.
    """
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll() -> object:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout} s: {predicate}")
            yield task.deferLater(reactor, interval, lambda: None)

    return poll()


def pending() -> list[DelayedCall]:
    """The reactor's delayed calls but trial's own (its timeout for the running fixture)."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if not getattr(call.func, "__module__", "").startswith("twisted.trial.")
    ]


def quiet(timeout: float = 5.0) -> defer.Deferred[None]:
    """Fires once the reactor has no delayed call left; fails naming the ones that stay.

    A test's last cleanup: trial would fail the test anyway, this lets timers
    that end on their own (a broker's reply timeout) end first.
    """
    d = until(lambda: not pending(), timeout)

    def name_them(failure: object) -> None:
        raise AssertionError(f"delayed calls left after {timeout} s: {pending()}")

    return d.addErrback(name_them)


def start_redis(workdir: Path) -> RedisServer:
    """A real redis-server on a free port (skipped outside CI when none is installed)."""
    require_redis()
    return RedisServer(workdir)
