"""One contract for answers that may come now or later.

A node answers synchronously when it can (one node, memory broker) and with
a Deferred when it must wait (Redis).  Everything above the node takes
``X | Deferred[X]`` through these two functions, and nothing else checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

# Checked first because isinstance() against Deferred goes through ABCMeta
# (Deferred is an Awaitable): measurably slow once per push.
_PLAIN = (int, dict, tuple, list, type(None), bytes)


def then(value: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(value, *args)`` now, or when ``value`` arrives if it is a Deferred."""
    if type(value) in _PLAIN or not isinstance(value, defer.Deferred):
        return fn(value, *args)
    return value.addCallback(fn, *args)


def settle(value: Any, done: Callable[..., Any], failed: Callable[..., Any], *args: Any) -> Any:
    """``done(result, *args)`` or ``failed(error, *args)``, now or later: a reply either way.

    ``args`` spare a caller a closure per request on the way to a later answer.
    """
    if type(value) in _PLAIN or not isinstance(value, defer.Deferred):
        return done(value, *args)
    return value.addCallbacks(done, _failed, callbackArgs=args, errbackArgs=(failed, *args))


def _failed(failure: Failure, failed: Callable[..., Any], *args: Any) -> Any:
    return failed(first_failure(failure).value, *args)


def gather(values: list[Any]) -> Any:
    """A list of the values, or a Deferred of it if any value is a Deferred."""
    if all(type(v) in _PLAIN or not isinstance(v, defer.Deferred) for v in values):
        return values
    d = defer.gatherResults(
        [defer.maybeDeferred(lambda v=v: v) for v in values], consumeErrors=True
    )
    return d.addErrback(first_failure)


def first_failure(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError (the one that matters), or itself."""
    while failure.check(defer.FirstError):
        failure = failure.value.subFailure
    return failure
