"""pushsvc.results: Later (the cluster push's answer) and the helpers that take any answer."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from pushsvc.errors import Unavailable
from pushsvc.results import Later, deferred, gather, is_later, settle, then


def test_steps_run_in_order_once_the_value_is_known() -> None:
    seen: list[Any] = []
    later = Later().then(lambda v: v + 1).then(lambda v, k: v * k, 10)
    later.then(seen.append)
    assert seen == []
    later.resolve(1)
    assert seen == [20]


def test_a_later_gets_one_value() -> None:
    later = Later()
    later.resolve(1)
    with pytest.raises(defer.AlreadyCalledError):
        later.resolve(2)
    with pytest.raises(defer.AlreadyCalledError):
        later.fail(Unavailable("late"))


def test_a_step_added_after_the_value_runs_at_once() -> None:
    later = Later()
    later.resolve(3)
    seen: list[int] = []
    later.then(lambda v: v * 2).then(seen.append)
    assert seen == [6]


def test_a_failure_skips_then_steps_down_to_the_next_settle() -> None:
    seen: list[Any] = []
    later = Later().then(lambda v: seen.append("skipped"))
    later.settle(lambda v: seen.append("done"), lambda e, tag: f"{tag}: {e}", "answered")
    later.then(seen.append)
    later.fail(Unavailable("Redis is unreachable"))
    assert seen == ["answered: Redis is unreachable"]


def test_an_exception_in_a_step_goes_to_the_next_failed() -> None:
    errors: list[BaseException] = []
    later = Later().then(lambda v: 1 // v).settle(lambda v: "no", errors.append)
    later.resolve(0)
    assert [type(e) for e in errors] == [ZeroDivisionError]


def test_an_exception_no_step_takes_is_logged_but_a_failed_value_is_not() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        Later().then(lambda v: 1 // v).resolve(0)
        Later().then(lambda v: v).fail(Unavailable("Redis is unreachable"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ZeroDivisionError)


def test_steps_added_while_running_run_after_those_before_them() -> None:
    order: list[str] = []
    later = Later()

    def first(value: int) -> int:
        later.then(lambda v: order.append(f"added {v}"))
        order.append("first")
        return value + 1

    later.then(first).then(lambda v: order.append(f"second {v}") or v)
    later.resolve(1)
    assert order == ["first", "second 2", "added 2"]


def test_a_step_that_returns_a_deferred_makes_the_rest_wait() -> None:
    inner: defer.Deferred[int] = defer.Deferred()
    seen: list[int] = []
    later = Later().then(lambda v: inner).then(lambda v: v + 1)
    later.then(seen.append)
    later.resolve(0)
    assert seen == []
    inner.callback(41)
    assert seen == [42]


def test_a_step_that_returns_a_failing_later_fails_the_rest() -> None:
    inner = Later()
    errors: list[BaseException] = []
    outer = Later().then(lambda v: inner).settle(lambda v: None, errors.append)
    outer.resolve(0)
    inner.fail(Unavailable("gone"))
    assert [str(e) for e in errors] == ["gone"]


def test_as_deferred_carries_the_value_and_the_error() -> None:
    ok, bad = Later(), Later()
    d_ok, d_bad = ok.as_deferred(), bad.as_deferred()
    ok.resolve(5)
    bad.fail(Unavailable("down"))
    assert isinstance(d_ok, defer.Deferred) and d_ok.result == 5
    failures: list[Any] = []
    d_bad.addErrback(failures.append)
    assert failures[0].check(Unavailable)


def test_then_and_settle_take_plain_values_laters_and_deferreds() -> None:
    assert then(2, lambda v, k: v * k, 3) == 6
    assert settle(2, lambda v: v + 1, lambda e: "failed") == 3
    later = Later()
    assert then(later, lambda v: v * 3) is later
    later.resolve(2)
    assert later.as_deferred().result == 6
    d: defer.Deferred[int] = defer.Deferred()
    out = settle(d, lambda v: v, lambda e: f"failed: {e}")
    d.errback(Unavailable("down"))
    assert out.result == "failed: down"


def test_a_deferred_waits_for_a_later_its_callback_returns() -> None:
    d: defer.Deferred[int] = defer.Deferred()
    inner = Later()
    out = then(d, lambda v: inner.then(lambda n: n + v))
    seen: list[int] = []
    out.addCallback(seen.append)
    d.callback(1)
    assert seen == []
    inner.resolve(10)
    assert seen == [11]


def test_gather_and_deferred_take_laters() -> None:
    assert gather([1, 2]) == [1, 2]
    later = Later()
    gathered = gather([1, later, defer.succeed(3)])
    assert isinstance(gathered, defer.Deferred) and not gathered.called
    later.resolve(2)
    assert gathered.result == [1, 2, 3]
    assert deferred(7).result == 7
    assert is_later(Later()) and is_later(defer.Deferred())
    assert not is_later(7) and not is_later({"ok": True})


@pytest.mark.parametrize("fail", [False, True])
def test_gather_reports_the_first_error_itself(fail: bool) -> None:
    later = Later()
    gathered = gather([later])
    errors: list[Any] = []
    gathered.addErrback(errors.append)
    if fail:
        later.fail(Unavailable("Redis is unreachable"))
        assert errors[0].check(Unavailable)
    else:
        later.resolve(1)
        assert gathered.result == [1]
