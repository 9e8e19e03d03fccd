"""Two shortcuts around costs that Twisted and Autobahn put on every frame.

Both were found by profiling a push under load (docs/performance.md, "Where
the time goes"); both touch library internals, so they are kept here, small
and separate, and the whole test suite runs through them.  Twisted is pinned
below 27 in pyproject.toml for that reason.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when nothing is queued ahead of it.

    Twisted's TCP transport queues every write, asks epoll to report the
    socket writable, sends on the next reactor turn and unregisters again:
    two ``epoll_ctl`` system calls per frame on top of the ``send()``.  Like
    asyncio, try ``send()`` first when the transport holds nothing, and hand
    Twisted only what the kernel did not take (and any error, which its own
    write path then reports as usual).
    """
    if (
        type(transport) is tcp.Server
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted will find on its own write
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _unformatted(*args: object, **kwargs: object) -> str:
    return ""


def quiet_autobahn_debug() -> None:
    """Stop Autobahn from formatting debug-log arguments that nobody will read.

    Autobahn writes ``self.log.debug("...", attrs=pformat(...))`` and
    ``func=hltype(...)``: the arguments are built before the (disabled) debug
    call returns, which cost a third of the CPU of each new connection
    (``pformat`` of 29 options) and an eighth of each sent frame (``hltype``
    / ``hlval`` colour formatting).  Those helpers only ever feed debug
    lines, so with debug logging off they are replaced by a no-op in
    Autobahn's WebSocket modules.
    """
    import autobahn.twisted.websocket as twisted_websocket
    import autobahn.websocket.protocol as websocket_protocol

    for module in (websocket_protocol, twisted_websocket):
        for name in ("pformat", "hltype", "hlval"):
            if hasattr(module, name):
                setattr(module, name, _unformatted)
