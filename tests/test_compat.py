"""Every library internal pushsvc relies on is still there (pushsvc/compat.py).

An upgrade of Twisted or Autobahn that removes one fails here,
naming it, instead of as a strange error in production.  The other tests
prove the check can fail: with an internal taken away, problems() names it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from reactor_helper import LeftInReactor, clear_leftovers
from twisted.internet import abstract, reactor

from pushsvc import compat


@pytest.fixture(autouse=True)
def _clear_reactor() -> Iterator[None]:
    """Clear what a test left in the global reactor.

    problems() leaves a live Autobahn connection's handshake timer and a TCP
    transport in the global reactor (test_the_check_leaves_nothing_in_the_reactor);
    the tests that run the reactor later must not inherit them.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeftInReactor)
        clear_leftovers()


def test_every_internal_compat_relies_on_is_there() -> None:
    missing = compat.problems()
    assert missing == [], (
        "pushsvc/compat.py relies on library internals that this environment lacks "
        "(pin the library, or change compat.py and its caller):\n" + "\n".join(missing)
    )


def remove(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    """Take ``name`` away from ``owner`` for one test, from the class that defines it."""
    defining = next(cls for cls in owner.__mro__ if name in vars(cls))
    monkeypatch.delattr(defining, name)


# Internals that can be taken away without breaking the library's own code that
# compat.problems() runs (Autobahn's own calls to pformat and hltype would fail first).
@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (abstract.FileDescriptor, "dataBuffer", "tcp.Server.dataBuffer"),
        (abstract.FileDescriptor, "_writeDisconnected", "tcp.Server._writeDisconnected"),
        (WebSocketServerProtocol, "sendCloseFrame", "WebSocketServerProtocol.sendCloseFrame"),
        (WebSocketServerProtocol, "dropConnection", "WebSocketServerProtocol.dropConnection"),
    ],
    ids=["dataBuffer", "_writeDisconnected", "sendCloseFrame", "dropConnection"],
)
def test_a_missing_internal_is_named(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, named: str
) -> None:
    remove(monkeypatch, owner, name)
    found = compat.problems()
    assert [line for line in found if named in line], found


def test_protocol_options_of_another_shape_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    options = tuple(WebSocketServerProtocol.CONFIG_ATTRS)
    monkeypatch.setattr(WebSocketServerProtocol, "CONFIG_ATTRS", options)
    found = compat.problems()
    assert [line for line in found if "CONFIG_ATTRS" in line], found


def test_the_check_closes_the_sockets_it_opens() -> None:
    """problems() looks at a real TCP transport over a socket pair; both ends must be closed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        compat.problems()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


def test_the_check_leaves_nothing_in_the_reactor() -> None:
    """The live transport and connection problems() inspects must not stay in the reactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeftInReactor)
        clear_leftovers()
    registered = {*reactor.getReaders(), *reactor.getWriters()}  # the reactor's own
    compat.problems()
    calls = reactor.getDelayedCalls()
    selectables = {*reactor.getReaders(), *reactor.getWriters()} - registered
    assert not calls and not selectables, (
        f"problems() left delayed calls {calls} and registered sockets {selectables}"
    )
