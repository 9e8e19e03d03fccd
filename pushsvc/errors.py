"""Every error a request can end in, every close code, and how each reaches a client.

One table for all transports: the backend port writes ``error <reason>`` (or
a JSON object with the request's ``id``), the HTTP API answers the status
below, and WebSocket closes use the codes below.  docs/protocol.md lists them.
"""

from __future__ import annotations

from typing import Any

# WebSocket close codes.  1000-2999 are the protocol's; 4000-4999 are pushsvc's.
CLOSE_GOING_AWAY = 1001  # shutdown: reconnect elsewhere
CLOSE_POLICY = 1008  # a browser sent frames faster than --client-rate
CLOSE_BAD_REQUEST = 4000  # the first frame is not a uid, token or hello
CLOSE_INVALID_TOKEN = 4001
CLOSE_TOKEN_EXPIRED = 4002
CLOSE_AUTH_TIMEOUT = 4008
CLOSE_DISCONNECTED = 4009  # the application's disconnect command (default code)
CLOSE_SLOW_CONSUMER = 4010
CLOSE_TOO_MANY_CONNECTIONS = 4029

INTERNAL = "internal error"


class PushError(Exception):
    """A request that cannot be served; ``reason`` goes back to the client as is."""

    status = 400  # the HTTP API's answer

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestError(PushError):
    """The request itself is wrong: a missing field, a bad value, malformed JSON."""


class UnknownCommand(RequestError):
    """No such command."""

    status = 404


class Unavailable(PushError):
    """Redis cannot be reached or did not answer in time: any answer would be a guess."""

    status = 503


class AuthError(Exception):
    """A WebSocket could not authenticate; ``code`` and ``reason`` go into its close frame."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def describe(error: BaseException) -> tuple[int, str]:
    """The HTTP status and reason of any exception; anything unexpected is a 500.

    Callers log the unexpected ones (status 500): they are bugs, not input.
    """
    if isinstance(error, PushError):
        return error.status, error.reason
    return 500, INTERNAL


def error_body(reason: str, rid: Any = None) -> dict[str, Any]:
    """The JSON shape of an error, with the request's ``id`` when it had one."""
    body: dict[str, Any] = {"ok": False, "error": reason}
    return body if rid is None else {"id": rid, **body}
