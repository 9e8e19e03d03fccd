"""The command model: every request a backend can make, declared once.

A request is a JSON object.  ``cmd`` names the command (default ``push``, so
the Workerman recipe's ``{"uid": "uid1", "percent": "88%"}`` is a push).  Each
command validates its own fields, runs against the registry and returns a
result dict.  The frontends (the TCP line protocol and the HTTP API) only
turn bytes into a request and a result or error back into bytes; they never
touch the registry themselves.  Adding a command is adding a function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred

from pushsvc import jsoncodec
from pushsvc.history import MAX_TTL
from pushsvc.registry import NOBODY, Registry, page

Result = dict[str, Any]
Reply = "Result | Deferred[Result]"
Handler = Callable[[Registry, dict], Reply]

MAX_PAGE = 1000
DEFAULT_PAGE = 100
DISCONNECT_CODE = 4009
DISCONNECT_REASON = "disconnected by the application"


class RequestError(Exception):
    """A request that cannot be served; ``reason`` is returned to the backend."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownCommand(RequestError):
    """No such command (the HTTP API answers 404 for it)."""


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    # Delivery commands (push, broadcast) answer a request without "id" with
    # the seed's bare ``ok``/``fail`` and are timed for the push histogram;
    # the others always answer with a JSON object.
    delivery: bool
    doc: str


COMMANDS: dict[str, Command] = {}


def command(name: str, *, delivery: bool = False) -> Callable[[Handler], Handler]:
    """Register a command; its docstring is its one-line description."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, delivery, (handler.__doc__ or "").strip())
        return handler

    return register


def lookup(request: object, name: str | None = None) -> Command:
    """The command a decoded request asks for (or ``name``, as HTTP gives it in the path)."""
    if not isinstance(request, dict):
        raise RequestError("request must be a JSON object")
    if name is None:
        name = request.get("cmd", "push")
        if not isinstance(name, str):
            raise RequestError("cmd must be a string")
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise UnknownCommand(f"unknown command {name!r}")
    return cmd


def request_id(request: object) -> Any:
    """The ``id`` a pipelining client put on its request, or None."""
    if isinstance(request, dict):
        rid = request.get("id")
        if isinstance(rid, (str, int, float)) and not isinstance(rid, bool):
            return rid
    return None


def execute(
    registry: Registry, request: object, name: str | None = None
) -> tuple[Command, Result | Deferred[Result]]:
    """Run a decoded request; raises RequestError for anything invalid."""
    cmd = lookup(request, name)
    if not cmd.delivery:
        return cmd, cmd.handler(registry, request)  # type: ignore[arg-type]
    started = perf_counter()
    try:
        result = cmd.handler(registry, request)  # type: ignore[arg-type]
    except RequestError:
        registry.metrics.pushes["error"] += 1
        raise
    registry.metrics.observe_push(perf_counter() - started)
    return cmd, result


def count_push(result: Result, registry: Registry) -> Result:
    # A push stored for later (ttl) is ok without being delivered: offline.
    registry.metrics.pushes["delivered" if result["delivered"] else "offline"] += 1
    return result


def counted_delivery(reached: int, registry: Registry) -> Result:
    registry.metrics.pushes["delivered" if reached else "offline"] += 1
    return {"ok": reached > 0, "delivered": reached}


# -- field validation shared by the commands --------------------------------


def names(request: dict, field: str, required: bool = True) -> list[str]:
    """A non-empty string or a non-empty list of them, as a list without duplicates."""
    value = request.get(field)
    if isinstance(value, str):
        if not value:
            raise RequestError(f"{field} must not be empty")
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(value))
    if value is None:
        if required:
            raise RequestError(f"missing {field}")
        return []
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
    return jsoncodec.dumps(value)  # exact for integers beyond 64 bits


def ttl(registry: Registry, request: dict) -> int:
    """Seconds to keep a push in history (0: not kept); the service default if absent."""
    history = registry.history
    if "ttl" not in request:
        return history.default_ttl if history is not None else 0
    seconds = integer(request, "ttl", 0, 0, MAX_TTL)
    if seconds and history is None:
        raise RequestError("history is not enabled on this service")
    return seconds


def excluded(request: dict) -> frozenset[str]:
    return frozenset(names(request, "exclude", required=False)) or NOBODY


def integer(request: dict, field: str, default: int, low: int, high: int) -> int:
    value = request.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{field} must be an integer from {low} to {high}")
    return value


def page_request(request: dict) -> tuple[str | None, int]:
    """The ``after`` cursor and ``limit`` of a paged listing."""
    after = request.get("after")
    if after is not None and not isinstance(after, str):
        raise RequestError("after must be a string")
    return after, integer(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)


def done(_: object) -> Result:
    return {"ok": True}


# Results that are never Deferreds; checked first because isinstance() against
# Deferred goes through ABCMeta (Deferred is an Awaitable), measurably slow per push.
_PLAIN = (int, dict, tuple, type(None))


def then(value: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Apply ``fn`` now, or when ``value`` arrives if it is a Deferred (cluster mode)."""
    if type(value) in _PLAIN or not isinstance(value, Deferred):
        return fn(value, *args)
    return value.addCallback(fn, *args)


def delivery(reached: int) -> Result:
    return {"ok": reached > 0, "delivered": reached}


# -- the commands -------------------------------------------------------------


@command("push", delivery=True)
def push(registry: Registry, request: dict) -> Reply:
    """Send data to every connection of some uids, or of some groups' members.

    With a ``ttl`` the push is also kept in each uid's (group's) history for
    clients that reconnect later, and frames carry positions (pushsvc.history).
    """
    if "group" in request:
        if "uid" in request:
            raise RequestError("give uid or group, not both")
        groups, data, skip = names(request, "group"), payload(request), excluded(request)
        seconds = ttl(registry, request)
        if seconds:
            return then(
                registry.history.push_groups(groups, data, skip, seconds),  # type: ignore[union-attr]
                count_push,
                registry,
            )
        reached = registry.push_groups(groups, data, skip)
    else:
        uids = names(request, "uid")
        data = payload(request)
        if "exclude" in request:
            skip = excluded(request)
            uids = [u for u in uids if u not in skip]
        seconds = ttl(registry, request)
        if seconds:
            return then(
                registry.history.push(uids, data, seconds),  # type: ignore[union-attr]
                count_push,
                registry,
            )
        reached = registry.push(uids, data)
    return then(reached, counted_delivery, registry)


@command("broadcast", delivery=True)
def broadcast(registry: Registry, request: dict) -> Reply:
    """Send data to every authenticated connection, but those of ``exclude``."""
    if "ttl" in request:
        raise RequestError("broadcast keeps no history: ttl is for uid and group pushes")
    registry.metrics.broadcasts += 1
    return then(registry.broadcast(payload(request), excluded(request)), delivery)


@command("join")
def join(registry: Registry, request: dict) -> Reply:
    """Put uids in groups: their current and future connections, until they leave."""
    return then(registry.join(names(request, "uid"), names(request, "group")), done)


@command("leave")
def leave(registry: Registry, request: dict) -> Reply:
    """Take uids out of groups."""
    return then(registry.leave(names(request, "uid"), names(request, "group")), done)


@command("online")
def online(registry: Registry, request: dict) -> Reply:
    """Which of the given uids have at least one live connection."""
    return then(
        registry.online(names(request, "uid")), lambda online: {"ok": True, "online": online}
    )


@command("stats")
def stats(registry: Registry, request: dict) -> Reply:
    """Online uids, authenticated connections, connections still authenticating, groups."""
    return then(registry.counts(), lambda counts: {"ok": True, **counts})


@command("list")
def list_online(registry: Registry, request: dict) -> Reply:
    """Online uids, sorted, a page at a time (``after`` the last uid of the previous page)."""
    after, limit = page_request(request)

    def listing(found: tuple[list[str], str | None, int]) -> Result:
        chunk, next_after, total = found
        return {"ok": True, "uids": chunk, "next": next_after, "total": total}

    return then(registry.list_online(after, limit), listing)


@command("members")
def members(registry: Registry, request: dict) -> Reply:
    """A group's member uids, sorted and paged, with how many there are and how many are online."""
    group = request.get("group")
    if not isinstance(group, str) or not group:
        raise RequestError("group must be a non-empty string")
    after, limit = page_request(request)
    everyone = registry.members(group)
    chunk, next_after = page(everyone, after, limit)

    def listing(online: dict[str, bool]) -> Result:
        return {
            "ok": True,
            "uids": chunk,
            "next": next_after,
            "total": len(everyone),
            "online": sum(online.values()),
        }

    return then(registry.online(list(everyone)), listing)


@command("disconnect")
def disconnect(registry: Registry, request: dict) -> Reply:
    """Close every connection of some uids (logout, ban) with a close code."""
    uids = names(request, "uid")
    code = request.get("code", DISCONNECT_CODE)
    if (
        not isinstance(code, int)
        or isinstance(code, bool)
        or not (code == 1000 or 3000 <= code <= 4999)
    ):
        raise RequestError("code must be 1000 or an integer from 3000 to 4999")
    reason = request.get("reason", DISCONNECT_REASON)
    if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
        raise RequestError("reason must be a string of at most 123 bytes")
    return then(registry.disconnect(uids, code, reason), lambda n: {"ok": True, "closed": n})
