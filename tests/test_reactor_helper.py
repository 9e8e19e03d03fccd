"""The reactor helper does what the Redis tests rely on: under pytest, a Deferred is awaited.

If pytest stopped handing trial's TestCase to trial's own ``run()``, a test
returning a Deferred would pass without its Deferred ever firing, and every
in-process Redis test would pass vacuously.  These run a small test file in
a child pytest and read its verdicts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import unittest as pyunit
from pathlib import Path

from reactor_helper import ReactorTestCase, clear_leftovers
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

HERE = Path(__file__).resolve().parent

CHILD_TESTS = '''
from reactor_helper import ReactorTestCase, until
from twisted.internet import reactor, task


class TestChild(ReactorTestCase):
    def test_awaited_failure(self):
        """Fails only if the Deferred is awaited: its callback runs a reactor turn later."""
        d = task.deferLater(reactor, 0.05, lambda: "late")
        return d.addCallback(lambda value: self.assertEqual(value, "never"))

    def test_awaited_success(self):
        return task.deferLater(reactor, 0.05, lambda: None)

    def test_left_a_timer(self):
        """Trial's janitor fails a test that leaves a delayed call behind."""
        reactor.callLater(30, lambda: None)

    def test_until_gives_up(self):
        return until(lambda: False, timeout=0.1)
'''


def test_deferreds_are_awaited_and_a_dirty_reactor_fails(tmp_path: Path) -> None:
    (tmp_path / "test_child.py").write_text(textwrap.dedent(CHILD_TESTS))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_child.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(HERE)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert "PASSED test_child.py::TestChild::test_awaited_success" in out, out
    for failing in ("test_awaited_failure", "test_left_a_timer", "test_until_gives_up"):
        assert f"FAILED test_child.py::TestChild::{failing}" in out, out
    assert "'late' != 'never'" in out, out
    assert "DirtyReactorAggregateError" in out, out


class _RunsTheReactor(ReactorTestCase):
    __test__ = False  # run by the test below, not collected

    def test_it(self) -> defer.Deferred[None]:
        def check() -> None:
            assert reactor.running

        return task.deferLater(reactor, 0, check)


class _PlainTrial(unittest.TestCase):
    __test__ = False

    def test_it(self) -> defer.Deferred[None]:
        return task.deferLater(reactor, 0, lambda: None)


def test_signal_handlers_are_as_they_were_after_a_reactor_test() -> None:
    """Trial's reactor.run() takes SIGINT and SIGTERM; Ctrl-C must still stop pytest after it."""
    # Twisted takes SIGINT only from Python's default handler; a run started in
    # the background (SIGINT ignored) must not change what this test shows.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_signal_handlers()
    finally:
        signal.signal(signal.SIGINT, outer)


def check_signal_handlers() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        clear_leftovers()
        plain = pyunit.TestResult()
        _PlainTrial("test_it").run(plain)
        assert plain.wasSuccessful(), plain.errors
        assert signal.getsignal(signal.SIGINT) != before[0]  # what the helper is for
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    result = pyunit.TestResult()
    _RunsTheReactor("test_it").run(result)
    assert result.wasSuccessful(), result.failures + result.errors
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
