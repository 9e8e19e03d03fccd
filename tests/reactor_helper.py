"""The global reactor, in-process under pytest, for code that talks to a real Redis.

pytest runs a ``twisted.trial.unittest.TestCase`` through trial's own
``run()``, so a test method that returns a Deferred is awaited: trial runs
the reactor until the Deferred fires (failing the test after ``timeout``
seconds), then fails the test if it left delayed calls or sockets in the
reactor, and stops the reactor's thread pool after each test.  That is the
isolation these tests need, with nothing installed beyond Twisted.

``ReactorTestCase`` adds two things.  Trial's ``reactor.run()`` installs
the reactor's SIGINT and SIGTERM handlers and never removes them, which
would leave Ctrl-C dead for the rest of the pytest run: they are put back
after each test.  And timers that earlier, reactor-less tests left in the
global reactor are cancelled, and sockets they left registered are closed
(with a warning) before each test, so that they neither run inside it nor
count against it.

``until`` is the bounded poll for states that no Deferred announces (a
Redis connection noticed down, a node's message received); ``quiet`` waits
(bounded) for a test's own timers to end before trial checks the reactor.
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, require_redis
from twisted.internet import defer, reactor, task
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ReactorTestCase(unittest.TestCase):
    """A trial TestCase run by pytest: a reactor without others' timers, signals as they were."""

    timeout = 20  # seconds before trial fails a test whose Deferred never fires

    def run(self, result: object) -> None:  # type: ignore[override]
        clear_leftovers()
        saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
        try:
            super().run(result)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


class LeftInReactor(UserWarning):
    """Timers and sockets that earlier tests left in the global reactor, cleared."""


def clear_leftovers() -> None:
    """Cancel the timers and close the sockets earlier tests left in the global reactor.

    Tests that never run the reactor may leave things in it (an Autobahn
    protocol's handshake or ping timeout, a transport registered for
    reading); nothing would ever have run them, and a reactor test must
    neither run them nor be blamed for them.  A warning names them.
    """
    calls = [call for call in reactor.getDelayedCalls() if call.active()]
    if calls:
        message = f"cancelled {len(calls)} delayed call(s) left by earlier tests: {calls}"
        for call in calls:
            call.cancel()
        warnings.warn(LeftInReactor(message), stacklevel=2)
    selectables = reactor.removeAll()  # all but the reactor's own (its waker)
    if selectables:
        for selectable in selectables:
            selectable.connectionLost(Failure(ConnectionDone("left by an earlier test")))
        message = f"closed {len(selectables)} socket(s) left by earlier tests: {selectables}"
        warnings.warn(LeftInReactor(message), stacklevel=2)


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


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a module's reactor tests (each test flushes it: FlushedRedis)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


class FlushedRedis:
    """Mixin for a ReactorTestCase: ``self.redis``, the module's server, emptied before each test.

    A module that uses it imports ``module_redis`` too, so pytest finds the fixture.
    """

    redis: RedisServer

    @pytest.fixture(autouse=True)
    def _redis(self, module_redis: RedisServer) -> None:
        self.redis = module_redis
        assert module_redis.command("FLUSHALL").startswith(b"+OK")
