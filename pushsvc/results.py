"""One contract for answers that may come now or later.

A node answers synchronously when it can (one node, memory broker) and
later when it must wait (Redis): with a :class:`Later` on the push path, a
Twisted ``Deferred`` elsewhere.  Everything above the node takes
``X | Later[X] | Deferred[X]`` through the functions of this module, and
nothing else checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Checked first because isinstance() against Deferred goes through ABCMeta
# (Deferred is an Awaitable): measurably slow once per push.
_PLAIN = (int, dict, tuple, list, type(None), bytes)

Step = tuple[Callable[..., Any], "Callable[..., Any] | None", tuple[Any, ...]]


class Later:
    """A value still to come (a PUBLISH's receiver count): the steps that wait for it, in order.

    Twisted's Deferred, cut down to what a cluster push needs.  A push that
    waits for Redis has three steps (the command's result, ``serve``'s reply,
    the backend's reply slot); a Deferred spends about 460 Python opcodes per
    push running them, a quarter of a cluster push's whole cost, a Later
    about 220, in less than half the time (``python bench/hotpath.py``;
    docs/performance.md, *The reply path*).

    A step is ``then(done, *args)`` — ``done(value, *args)`` replaces the
    value — or ``settle(done, failed, *args)``, which also takes a failure
    (``failed(error, *args)`` with the exception itself, not a Failure).  An
    exception raised by a step fails the steps after it, down to the next
    ``failed``; one that no step is left to take is logged.  A step that
    returns a Later or a Deferred makes the rest wait for it.  Steps added
    once the value is known run at once.
    """

    __slots__ = ("_steps", "_value", "_ok")

    def __init__(self) -> None:
        self._steps: list[Step] = []
        self._value: Any = None
        self._ok: bool | None = None  # None: not known yet; False: _value is the exception

    def then(self, done: Callable[..., Any], *args: Any) -> Later:
        return then(self, done, *args)  # type: ignore[no-any-return]

    def settle(self, done: Callable[..., Any], failed: Callable[..., Any], *args: Any) -> Later:
        return settle(self, done, failed, *args)  # type: ignore[no-any-return]

    def resolve(self, value: Any) -> None:
        """The value is known: run the steps."""
        if self._ok is not None:
            raise defer.AlreadyCalledError(f"{self!r} already has its value")
        self._value, self._ok = value, True
        self._run()

    def fail(self, error: BaseException) -> None:
        """No value will come: the steps that take failures get ``error``."""
        if self._ok is not None:
            raise defer.AlreadyCalledError(f"{self!r} already has its value")
        self._value, self._ok = error, False
        self._run()

    def as_deferred(self) -> defer.Deferred[Any]:
        """The same value as a Deferred, for code written for Twisted (HTTP, gatherResults)."""
        d: defer.Deferred[Any] = defer.Deferred()
        self.settle(d.callback, d.errback)
        return d

    def _run(self) -> None:
        value, ok = self._value, self._ok
        self._ok = None  # running: a step added meanwhile joins ``steps`` and runs in turn
        steps = self._steps
        raised = False
        for step in steps:
            done, failed, args = step
            try:
                if ok:
                    value = done(value, *args)
                elif failed is not None:
                    value = failed(value, *args)
                    ok = True
                else:
                    continue
            except Exception as e:  # noqa: BLE001 - for the next step that takes failures
                value, ok, raised = e, False, True
                continue
            if type(value) not in _PLAIN and isinstance(value, _WAITING):
                # The rest wait for the value it stands for.
                at = next(i for i, s in enumerate(steps) if s is step)
                self._steps = steps[at + 1 :]
                settle(value, self.resolve, self.fail)
                return
        steps.clear()
        self._value, self._ok = value, ok
        if raised and not ok:  # an exception no step took: a bug, not an answer
            failure = Failure(value, type(value), value.__traceback__)
            log.failure("a step of a Later failed", failure)


# What a value still to come is: the rest of a Later's steps wait for it.
_WAITING = (Later, defer.Deferred)


def then(value: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(value, *args)`` now, or when ``value`` arrives if it is a Later or a Deferred.

    A Later's step is added here (and in :func:`settle`), not through its
    methods: one Python call less per step on every cluster push.
    """
    kind = type(value)
    if kind is Later:
        value._steps.append((fn, None, args))
        if value._ok is not None:
            value._run()
        return value
    if kind in _PLAIN or not isinstance(value, defer.Deferred):
        return fn(value, *args)
    return value.addCallback(_adopted, fn, args)


def settle(value: Any, done: Callable[..., Any], failed: Callable[..., Any], *args: Any) -> Any:
    """``done(result, *args)`` or ``failed(error, *args)``, now or later: a reply either way.

    ``args`` spare a caller a closure per request on the way to a later answer.
    """
    kind = type(value)
    if kind is Later:
        value._steps.append((done, failed, args))
        if value._ok is not None:
            value._run()
        return value
    if kind in _PLAIN or not isinstance(value, defer.Deferred):
        return done(value, *args)
    return value.addCallbacks(
        _adopted, _failed, callbackArgs=(done, args), errbackArgs=(failed, *args)
    )


def _adopted(value: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """A Deferred's callback: ``fn``'s Later becomes a Deferred it can wait for."""
    result = fn(value, *args)
    return result.as_deferred() if type(result) is Later else result


def _failed(failure: Failure, failed: Callable[..., Any], *args: Any) -> Any:
    return _adopted(first_failure(failure).value, failed, args)


def is_later(value: Any) -> bool:
    """Whether ``value`` is an answer still to come (a Later or a Deferred)."""
    return type(value) not in _PLAIN and isinstance(value, _WAITING)


def deferred(value: Any) -> defer.Deferred[Any]:
    """Any answer as a Deferred, for code written for Twisted."""
    if type(value) is Later:
        return value.as_deferred()
    return defer.maybeDeferred(lambda: value)


def gather(values: list[Any]) -> Any:
    """A list of the values, or a Deferred of it if any value is still to come."""
    if not any(is_later(v) for v in values):
        return values
    d = defer.gatherResults([deferred(v) for v in values], consumeErrors=True)
    return d.addErrback(first_failure)


def first_failure(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError (the one that matters), or itself."""
    while failure.check(defer.FirstError):
        failure = failure.value.subFailure
    return failure
