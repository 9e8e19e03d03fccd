"""The demo's backend: push a task's progress, 0% to 100%, to one uid.

Open http://127.0.0.1:8080/demo?uid=uid1 in a browser, then run
``python -m pushsvc.demo --uid uid1`` and watch the bar move.  It speaks the
backend port's line protocol over a plain socket, the way any web app would,
and prints the service's ``ok``/``fail`` for every step.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence


def step_size(value: str) -> int:
    step = int(value)
    if not 1 <= step <= 100:
        raise argparse.ArgumentTypeError("must be from 1 to 100")
    return step


def non_negative(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own options (also used by ``pushsvc demo``, which has its own --host/--port)."""
    parser.add_argument("--uid", default="uid1", help="who receives it (default: uid1)")
    parser.add_argument("--step", type=step_size, default=10, help="percent per step (10)")
    parser.add_argument(
        "--delay", type=non_negative, default=0.5, help="seconds between steps (0.5)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='send {"percent": N} objects instead of the recipe\'s "N%%" strings',
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pushsvc.demo",
        description="Push a task's progress (0%..100%) to a uid, one line per step.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="backend port host (127.0.0.1)")
    parser.add_argument("--port", type=int, default=5678, help="backend port (5678)")
    add_arguments(parser)
    return parser.parse_args(argv)


def steps(step: int) -> list[int]:
    """0, step, 2*step, ... and always 100 last, so the bar always finishes."""
    values = list(range(0, 100, step))
    return [*values, 100]


def request(uid: str, percent: int, as_json: bool) -> bytes:
    """One backend line: the recipe's ``{"uid": ..., "percent": "88%"}``, or a JSON object."""
    line = (
        {"uid": uid, "data": {"percent": percent}}
        if as_json
        else {"uid": uid, "percent": f"{percent}%"}
    )
    return json.dumps(line).encode("utf-8") + b"\n"


def run(host: str, port: int, args: argparse.Namespace) -> int:
    """Push every step to ``args.uid``: 0 if all were delivered, 1 if not, 2 if unreachable."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"cannot connect to {host}:{port}: {e}", file=sys.stderr)
        return 2
    failed = 0
    with sock, sock.makefile("rb") as replies:
        for i, percent in enumerate(steps(args.step)):
            if i and args.delay:
                time.sleep(args.delay)
            sock.sendall(request(args.uid, percent, args.json))
            reply = replies.readline().decode("utf-8", "replace").strip()
            if not reply:
                print("the service closed the connection", file=sys.stderr)
                return 2
            print(f"{percent:3d}% {reply}", flush=True)
            failed += reply != "ok"
    if failed:
        print(f"{failed} step(s) not delivered: is {args.uid!r} connected?", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pushsvc.demo``: the exit code says whether the page got every step."""
    args = parse_args(argv)
    return run(args.host, args.port, args)


if __name__ == "__main__":
    sys.exit(main())
