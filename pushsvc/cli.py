"""``pushsvc``: push, broadcast and look at a running service from a shell.

For operators ("is user 42 online?", "send everyone a maintenance notice")
and for shell scripts, which want exit codes rather than output to parse:

    0  delivered / ok          (online: every uid given is online)
    1  not delivered: "fail"   (online: at least one uid is offline)
    2  usage error, unreachable service, or a request pushsvc rejected

The address comes from ``--host``/``--port``, else ``PUSHSVC_ADDR``
(``host:port`` or ``tcp://host:port``), else 127.0.0.1:5678.

A subcommand is one function decorated with ``@subcommand``: its docstring
is its help, ``configure`` adds its arguments, and it returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pushsvc import __version__, demo
from pushsvc.client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Client,
    PushError,
    parse_address,
)

ADDR_ENV = "PUSHSVC_ADDR"
SECRET_ENV = "PUSHSVC_BACKEND_SECRET"  # the service's own variable for the same secret

OK, FAIL, ERROR = 0, 1, 2

Run = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


class UsageError(Exception):
    """Bad input found after argparse (invalid --json data, a bad PUSHSVC_ADDR): exit 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    run: Run
    configure: Configure | None
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, configure: Configure | None = None) -> Callable[[Run], Run]:
    """Register ``pushsvc NAME``: the one place a new subcommand is added."""

    def register(run: Run) -> Run:
        doc = (run.__doc__ or "").strip()
        SUBCOMMANDS[name] = Subcommand(name, run, configure, doc)
        return run

    return register


# -- shared helpers ---------------------------------------------------------------


def client(args: argparse.Namespace) -> Client:
    """A Client for the address the options and environment say."""
    host, port = DEFAULT_HOST, DEFAULT_PORT
    env = os.environ.get(ADDR_ENV, "").strip()
    if env:
        try:
            host, port = parse_address(env)
        except ValueError as e:
            raise UsageError(f"{ADDR_ENV}: {e}") from None
    if args.host is not None:
        host = args.host
    if args.port is not None:
        port = args.port
    secret = backend_secret(getattr(args, "backend_secret_file", None))
    return Client(host, port, connect_timeout=args.timeout, timeout=args.timeout, secret=secret)


def backend_secret(path: str | None) -> str | None:
    """The backend secret: ``--backend-secret-file`` (its first line), else the environment.

    A file of several lines is the service's rotation list: the first is the
    current secret.  Never a flag of its own: ``ps`` shows arguments.
    """
    if path is None:
        return os.environ.get(SECRET_ENV, "").strip() or None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UsageError(f"--backend-secret-file {path}: {reason}") from None
    if not lines:
        raise UsageError(f"--backend-secret-file {path}: the file is empty")
    return lines[0]


def read_data(args: argparse.Namespace) -> Any:
    """DATA as given (``-``: read stdin), parsed as JSON with ``--json``."""
    text = args.data
    if text == "-":
        text = sys.stdin.read()
        if not args.json and text.endswith("\n"):
            text = text[:-1]
    if not args.json:
        return text
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"DATA is not valid JSON: {e}") from None


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


def delivery_result(delivered: int) -> int:
    print("ok" if delivered else "fail")
    return OK if delivered else FAIL


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="text to send; '-' reads it from stdin")
    parser.add_argument(
        "--json",
        action="store_true",
        help="DATA is JSON: send the value (the browser gets its compact JSON text)",
    )


# -- subcommands ----------------------------------------------------------------


def configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="UID", help="the uid to push to (a group with --group)")
    add_data_arguments(parser)
    parser.add_argument(
        "--group", action="store_true", help="UID names a group: push to its members"
    )


@subcommand("push", configure_push)
def run_push(args: argparse.Namespace) -> int:
    """Send DATA to every connection of UID; prints ok (exit 0) or fail (exit 1)."""
    data = read_data(args)
    with client(args) as c:
        if args.group:
            return delivery_result(c.push(group=args.target, data=data))
        return delivery_result(c.push(args.target, data))


@subcommand("broadcast", add_data_arguments)
def run_broadcast(args: argparse.Namespace) -> int:
    """Send DATA to every connected browser; prints ok (exit 0) or fail: nobody (exit 1)."""
    data = read_data(args)
    with client(args) as c:
        return delivery_result(c.broadcast(data))


def configure_online(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uids", metavar="UID", nargs="+", help="uids to look up")


@subcommand("online", configure_online)
def run_online(args: argparse.Namespace) -> int:
    """Print {"uid": true|false, ...}; exit 0 if every UID is online, else 1."""
    with client(args) as c:
        online = c.online(args.uids)
    print_json(online)
    return OK if all(online.values()) else FAIL


@subcommand("stats")
def run_stats(args: argparse.Namespace) -> int:
    """Print the service's counters as JSON (online uids, connections, ...)."""
    with client(args) as c:
        print_json(c.stats())
    return OK


@subcommand("demo", demo.add_arguments)
def run_demo(args: argparse.Namespace) -> int:
    """Push a task's progress, 0 to 100 percent, to --uid for the /demo page to show."""
    address = client(args)  # only for the address the options and environment say
    return demo.run(address.host, address.port, args)


# -- entry point -------------------------------------------------------------------


def positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


def port_number(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError("must be from 1 to 65535")
    return number


def connection_options(default: Any) -> argparse.ArgumentParser:
    """--host/--port/--timeout, accepted before and after the subcommand name.

    After it, the default is SUPPRESS so a value given before it is kept.
    """
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--host",
        default=default,
        help=f"backend host (default: from ${ADDR_ENV}, else {DEFAULT_HOST})",
    )
    group.add_argument(
        "--port",
        type=port_number,
        default=default,
        help=f"backend port (default: from ${ADDR_ENV}, else {DEFAULT_PORT})",
    )
    group.add_argument(
        "--backend-secret-file",
        default=default,
        metavar="FILE",
        help=f"the backend secret, if the service has one (default: ${SECRET_ENV})",
    )
    group.add_argument(
        "--timeout",
        type=positive,
        default=5.0 if default is None else default,
        help="seconds to wait for the service (default: 5)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushsvc",
        description="Push to browsers connected to pushsvc, and look at the service.",
        epilog="exit status: 0 ok, 1 fail (not delivered / offline), 2 error",
        parents=[connection_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"pushsvc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    after = connection_options(argparse.SUPPRESS)
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[after])
        if cmd.configure is not None:
            cmd.configure(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pushsvc``; returns (and as a console script, exits with) the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        parser.exit(ERROR, f"pushsvc: error: {e}\n")
    except PushError as e:
        print(f"pushsvc: error: {e}", file=sys.stderr)
    except OSError as e:  # stdin or stdout trouble
        print(f"pushsvc: error: {e}", file=sys.stderr)
    return ERROR


if __name__ == "__main__":
    sys.exit(main())
