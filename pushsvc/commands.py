"""The command model: every request a backend can make, declared once.

A request is a JSON object.  ``cmd`` names the command (default ``push``, so
the Workerman recipe's ``{"uid": "uid1", "percent": "88%"}`` is a push).  Each
command validates its own fields, runs against the registry and returns a
result dict.  The frontends (the TCP line protocol, later HTTP) only parse
bytes into a request and format the result or error back; they never touch
the registry themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from twisted.internet.defer import Deferred

from pushsvc.registry import Registry

Result = dict[str, Any]
Handler = Callable[[Registry, dict], "Result | Deferred[Result]"]


class RequestError(Exception):
    """A request that cannot be served; ``reason`` is returned to the backend."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    # Seed-compatible commands answer a request without "id" with a bare
    # ``ok``/``fail``; the others always answer with a JSON object.
    plain: bool
    doc: str


COMMANDS: dict[str, Command] = {}


def command(name: str, *, plain: bool = False) -> Callable[[Handler], Handler]:
    """Register a command; its docstring is its one-line description."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, plain, (handler.__doc__ or "").strip())
        return handler

    return register


def lookup(request: object) -> Command:
    """The command a decoded request asks for, or RequestError."""
    if not isinstance(request, dict):
        raise RequestError("request must be a JSON object")
    name = request.get("cmd", "push")
    if not isinstance(name, str):
        raise RequestError("cmd must be a string")
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise RequestError(f"unknown command {name!r}")
    return cmd


def request_id(request: object) -> Any:
    """The ``id`` a pipelining client put on its request, or None."""
    if isinstance(request, dict):
        rid = request.get("id")
        if rid is None or isinstance(rid, (str, int, float)) and not isinstance(rid, bool):
            return rid
    return None


# -- field validation shared by the commands --------------------------------


def uid_list(request: dict, field: str = "uid") -> list[str]:
    """A uid or a non-empty list of uids, as a list without duplicates."""
    value = request.get(field)
    if isinstance(value, str):
        if not value:
            raise RequestError(f"{field} must not be empty")
        return [value]
    if isinstance(value, list) and value:
        if not all(isinstance(u, str) and u for u in value):
            raise RequestError(f"{field} must be a non-empty string or a list of them")
        return list(dict.fromkeys(value))
    if value is None:
        raise RequestError(f"missing {field}")
    raise RequestError(f"{field} must be a non-empty string or a list of them")


def payload(request: dict) -> bytes:
    """The text to send: ``data`` (or the seed's ``percent``) as is if a string, else as JSON."""
    if "data" in request:
        value = request["data"]
    elif "percent" in request:
        value = request["percent"]
    else:
        raise RequestError("missing data")
    if isinstance(value, str):
        return value.encode("utf-8")
    return orjson.dumps(value)


def delivery(reached: int) -> Result:
    return {"ok": reached > 0, "delivered": reached}


# -- the commands -------------------------------------------------------------


@command("push", plain=True)
def push(registry: Registry, request: dict) -> Result:
    """Send data to every connection of one or more uids."""
    return delivery(registry.push(uid_list(request), payload(request)))


@command("broadcast", plain=True)
def broadcast(registry: Registry, request: dict) -> Result:
    """Send data to every authenticated connection."""
    return delivery(registry.broadcast(payload(request)))


@command("online")
def online(registry: Registry, request: dict) -> Result:
    """Which of the given uids have at least one live connection."""
    uids = uid_list(request)
    return {"ok": True, "online": {uid: registry.is_online(uid) for uid in uids}}


@command("stats")
def stats(registry: Registry, request: dict) -> Result:
    """Online uids, authenticated connections and connections still authenticating."""
    return {
        "ok": True,
        "uids": registry.online_count(),
        "connections": registry.connection_count(),
        "pending": registry.pending_count(),
    }


def execute(registry: Registry, request: object) -> tuple[Command, Result | Deferred[Result]]:
    """Run a decoded request; raises RequestError for anything invalid."""
    cmd = lookup(request)
    return cmd, cmd.handler(registry, request)  # type: ignore[arg-type]
