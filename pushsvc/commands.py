"""The command model: every request a backend can make, declared once.

A request is a JSON object.  ``cmd`` names the command (default ``push``, so
the Workerman recipe's ``{"uid": "uid1", "percent": "88%"}`` is a push).  Each
command validates its own fields, calls the node and returns a result dict.
The transports (the backend port and the HTTP API) only turn bytes into a
request and hand :func:`serve` two functions that turn a result or an error
back into bytes; they never touch the node themselves.  Adding a command is
adding a function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol, TypeVar

from twisted.logger import Logger
from twisted.python.failure import Failure

from pushsvc import jsoncodec
from pushsvc.errors import (
    CLOSE_DISCONNECTED,
    RequestError,
    Unavailable,
    UnknownCommand,
    describe,
)
from pushsvc.history.store import MAX_TTL
from pushsvc.hub import NOBODY, page
from pushsvc.node import Node, Stored
from pushsvc.results import settle, then

log = Logger()

Result = dict[str, Any]
Reply = Any  # Result, or a Deferred of one
Handler = Callable[[Node, dict], Reply]
T = TypeVar("T")

MAX_PAGE = 1000
DEFAULT_PAGE = 100
DISCONNECT_REASON = "disconnected by the application"


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


class Answering(Protocol[T]):
    """A transport's side of :func:`serve`: how it words a result and an error."""

    def answered(self, cmd: Command, result: Result, request: Any) -> T: ...

    def refused(self, error: BaseException, request: Any) -> T: ...


def serve(node: Node, request: object, name: str | None, to: Answering[T]) -> T | Any:
    """Run a request and turn its outcome into ``to``'s reply, now or when it is known.

    Every transport answers through here, so an error maps to the same reply
    everywhere (pushsvc.errors) and only a bug (an error that is not a
    request error) is logged, once, with its traceback.  The transports'
    methods are passed, not closures: nothing is allocated per request on
    the way to a synchronous answer.
    """
    try:
        cmd = lookup(request, name)
        if cmd.delivery:  # timed for the push histogram; errors counted
            started = perf_counter()
            try:
                result = cmd.handler(node, request)  # type: ignore[arg-type]
            except RequestError:
                node.metrics.pushes["error"] += 1
                raise
            node.metrics.observe_push(perf_counter() - started)
        else:
            result = cmd.handler(node, request)  # type: ignore[arg-type]
    except Exception as e:
        return _refused(e, request, to)
    if type(result) is dict:
        return to.answered(cmd, result, request)
    return settle(result, _answered_later, _refused_later, cmd, request, to)


def _answered_later(result: Result, cmd: Command, request: object, to: Answering[T]) -> T:
    return to.answered(cmd, result, request)


def _refused_later(error: BaseException, cmd: Command, request: object, to: Answering[T]) -> T:
    return _refused(error, request, to)


def _refused(error: BaseException, request: object, to: Answering[T]) -> T:
    if describe(error)[0] == 500:
        log.failure("command failed", _failure(error))
    return to.refused(error, request)


def _failure(error: BaseException) -> Failure:
    return Failure(error, type(error), error.__traceback__)


def delivered(reached: int, node: Node) -> Result:
    """A push's answer, counted in pushsvc_pushes_total (broadcasts are counted apart)."""
    node.metrics.pushes["delivered" if reached else "offline"] += 1
    return {"ok": reached > 0, "delivered": reached}


def stored_result(results: list[Stored], node: Node) -> Result:
    """A push-with-ttl's answer: delivered now, and whether every channel stored it.

    Nobody reached and nothing stored (the store unreachable) is an error.
    """
    total = sum(r[0] for r in results)
    positions = {r[1]: r[2] for r in results if r[2] is not None}
    if not positions and not total:
        reason = next(r[3] for r in results if r[3])
        raise Unavailable(f"history unavailable: {reason}")
    # A push stored for later is ok without being delivered: offline.
    node.metrics.pushes["delivered" if total else "offline"] += 1
    result: Result = {"ok": True, "delivered": total, "queued": len(positions) == len(results)}
    if len(results) == 1 and positions:
        ((off, ep),) = positions.values()
        result["off"], result["ep"] = off, ep
    elif len(results) > 1:
        result["positions"] = {ch: list(pos) for ch, pos in positions.items()}
    return result


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
    try:
        return jsoncodec.dumps(value)  # exact for integers beyond 64 bits
    except (TypeError, RecursionError) as e:  # orjson.JSONEncodeError is a TypeError
        # The request decoded, so only its shape can be at fault: orjson reads
        # 1023 levels of nesting but writes at most MAX_DEPTH.
        if isinstance(e, RecursionError) or "ecursion" in str(e):
            raise RequestError(
                f"data nested too deeply (at most {jsoncodec.MAX_DEPTH} levels of arrays "
                "and objects)"
            ) from None
        raise RequestError(f"data cannot be written as JSON: {e}") from None


def ttl(node: Node, request: dict) -> int:
    """Seconds to keep a push in history (0: not kept); the service default if absent."""
    if "ttl" not in request:
        return node.default_ttl
    return integer(request, "ttl", 0, 0, MAX_TTL)


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


def delivery(reached: int) -> Result:
    """A broadcast's answer (the shape of a push's, without counting it as one)."""
    return {"ok": reached > 0, "delivered": reached}


# -- the commands -------------------------------------------------------------


@command("push", delivery=True)
def push(node: Node, request: dict) -> Reply:
    """Send data to every connection of some uids, or of some groups' members.

    With a ``ttl`` the push is also kept in each uid's (group's) history for
    clients that reconnect later, and frames carry positions (pushsvc.history).
    """
    if "group" in request:
        if "uid" in request:
            raise RequestError("give uid or group, not both")
        groups, data, skip = names(request, "group"), payload(request), excluded(request)
        seconds = ttl(node, request)
        if seconds:
            return then(node.push_groups_stored(groups, data, skip, seconds), stored_result, node)
        return then(node.push_groups(groups, data, skip), delivered, node)
    uids = names(request, "uid")
    data = payload(request)
    if "exclude" in request:
        skip = excluded(request)
        uids = [u for u in uids if u not in skip]
    seconds = ttl(node, request)
    if seconds:
        return then(node.push_stored(uids, data, seconds), stored_result, node)
    return then(node.push(uids, data), delivered, node)


@command("broadcast", delivery=True)
def broadcast(node: Node, request: dict) -> Reply:
    """Send data to every authenticated connection, but those of ``exclude``."""
    if "ttl" in request:
        raise RequestError("broadcast keeps no history: ttl is for uid and group pushes")
    node.metrics.broadcasts += 1
    return then(node.broadcast(payload(request), excluded(request)), delivery)


@command("join")
def join(node: Node, request: dict) -> Reply:
    """Put uids in groups: their current and future connections, until they leave."""
    return then(node.join(names(request, "uid"), names(request, "group")), done)


@command("leave")
def leave(node: Node, request: dict) -> Reply:
    """Take uids out of groups."""
    return then(node.leave(names(request, "uid"), names(request, "group")), done)


@command("online")
def online(node: Node, request: dict) -> Reply:
    """Which of the given uids have at least one live connection."""
    return then(node.online(names(request, "uid")), lambda online: {"ok": True, "online": online})


@command("stats")
def stats(node: Node, request: dict) -> Reply:
    """Online uids, authenticated connections, connections still authenticating, groups."""
    return then(node.counts(), lambda counts: {"ok": True, **counts})


@command("list")
def list_online(node: Node, request: dict) -> Reply:
    """Online uids, sorted, a page at a time (``after`` the last uid of the previous page)."""
    after, limit = page_request(request)

    def listing(found: tuple[list[str], str | None, int]) -> Result:
        chunk, next_after, total = found
        return {"ok": True, "uids": chunk, "next": next_after, "total": total}

    return then(node.list_online(after, limit), listing)


@command("members")
def members(node: Node, request: dict) -> Reply:
    """A group's member uids, sorted and paged, with how many there are and how many are online."""
    group = request.get("group")
    if not isinstance(group, str) or not group:
        raise RequestError("group must be a non-empty string")
    after, limit = page_request(request)
    everyone = node.members(group)
    chunk, next_after = page(everyone, after, limit)

    def listing(online: dict[str, bool]) -> Result:
        return {
            "ok": True,
            "uids": chunk,
            "next": next_after,
            "total": len(everyone),
            "online": sum(online.values()),
        }

    return then(node.online(list(everyone)), listing)


@command("disconnect")
def disconnect(node: Node, request: dict) -> Reply:
    """Close every connection of some uids (logout, ban) with a close code."""
    uids = names(request, "uid")
    code = request.get("code", CLOSE_DISCONNECTED)
    if (
        not isinstance(code, int)
        or isinstance(code, bool)
        or not (code == 1000 or 3000 <= code <= 4999)
    ):
        raise RequestError("code must be 1000 or an integer from 3000 to 4999")
    reason = request.get("reason", DISCONNECT_REASON)
    if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
        raise RequestError("reason must be a string of at most 123 bytes")
    return then(node.disconnect(uids, code, reason), lambda n: {"ok": True, "closed": n})
