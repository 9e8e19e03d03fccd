"""Two choices on a cluster push's path, measured side by side in one process.

- Waiting for the PUBLISH reply: Twisted's ``Deferred`` against
  ``pushsvc.results.Later``, each carrying the three steps a backend's push
  takes (the command's result, ``serve``'s reply, the backend's reply slot),
  created, chained and fired as on node B.
- Packing the PUBLISH: ``hiredis.pack_command`` against
  ``pushsvc.broker.connection.publish_command`` (same bytes).

Each figure is the best of ``--repeat`` timings of ``--number`` runs
(nanoseconds per push), and pushsvc's choice as a ratio of the other, taken in
the same invocation so that the machine's load cancels out:

    python bench/hotpath.py
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import hiredis
from twisted.internet.defer import Deferred

from pushsvc.broker.connection import publish_command
from pushsvc.results import Later, settle, then

CHANNEL = "pushsvc:u:user-123"
MESSAGE = b"host-1234-abcdef\x001764614400000\x00\x00\x0088%"


def delivered(reached: int, node: Any) -> dict:
    return {"ok": reached > 0, "delivered": reached}


def answered(result: dict, cmd: Any, request: Any, to: Any) -> bytes:
    return b"ok\n" if result["ok"] else b"fail\n"


def refused(error: BaseException, cmd: Any, request: Any, to: Any) -> bytes:
    return b"error\n"


def resolved(value: bytes, slot: list[bytes | None]) -> None:
    slot[0] = value


def broken(error: Any, slot: list[bytes | None]) -> None:
    slot[0] = b"error\n"


def with_deferred() -> None:
    d: Deferred[int] = Deferred()
    d.addCallback(delivered, None)
    d.addCallbacks(answered, refused, callbackArgs=(1, 2, 3), errbackArgs=(1, 2, 3))
    slot: list[bytes | None] = [None]
    d.addCallbacks(resolved, broken, callbackArgs=(slot,), errbackArgs=(slot,))
    d.callback(1)


def with_later() -> None:
    later = Later()
    then(later, delivered, None)  # as the push command, serve and the backend add them
    settle(later, answered, refused, 1, 2, 3)
    slot: list[bytes | None] = [None]
    settle(later, resolved, broken, slot)
    later.resolve(1)


def with_hiredis() -> None:
    hiredis.pack_command(("PUBLISH", CHANNEL, MESSAGE))


def with_pushsvc() -> None:
    publish_command(CHANNEL.encode(), MESSAGE)


def best_ns(fn: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    assert publish_command(CHANNEL.encode(), MESSAGE) == hiredis.pack_command(
        ("PUBLISH", CHANNEL, MESSAGE)
    )
    print("| on a cluster push's path | the library | pushsvc's | ratio |")
    print("|---|---:|---:|---:|")
    for what, theirs, ours in (
        ("wait for the PUBLISH reply, 3 steps (Deferred / Later)", with_deferred, with_later),
        ("pack the PUBLISH (hiredis.pack_command / publish_command)", with_hiredis, with_pushsvc),
    ):
        a = best_ns(theirs, args.number, args.repeat)
        b = best_ns(ours, args.number, args.repeat)
        print(f"| {what} | {a:,.0f} ns | {b:,.0f} ns | {b / a:.2f} |")


if __name__ == "__main__":
    main()
