"""CPU instructions per backend line, counted by valgrind: repeatable on a noisy machine.

Timings on a shared two-core machine swing by tens of per cent from one run
to the next; instruction counts do not.  This script feeds seed-format push
lines (the backend port's whole path: split, decode, command, node, hub,
broker, reply) for an offline uid, then for a uid with one browser connected
through the real WebSocket protocol (the frame written to it included), to an
in-process BackendProtocol under
``valgrind --tool=callgrind``, once with no lines and once with many, and
prints the difference per line.  Give ``--checkout DIR`` to measure another
checkout of pushsvc (an older commit in a ``git worktree``) in the same
invocation:

    python bench/instructions.py --checkout ../pushsvc-old --checkout .
    python bench/instructions.py --kind connect --checkout ../pushsvc-old --checkout .

Each figure is the median over ``--seeds`` string-hash seeds (3 by default).
``--kind spread`` sends each line to the next of 1,000 browsers, as the
benchmark's unicast scenario does.

``--kind cluster`` and ``--kind cluster-spread`` are ``online`` and
``spread`` through two nodes and a redis-server in one process (the browsers
on node A, the backend on node B, every push through Redis): the count is
both nodes' instructions per push; Redis is a separate process and not
counted.  Compare them with ``online`` and ``spread`` (one node):

    python bench/instructions.py --kind online --kind cluster --kind spread --kind cluster-spread

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKLOAD = HERE / "instructions_workload.py"

COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(checkout: Path, rounds: int, kind: str, seed: int) -> int:
    """Instructions valgrind counted for a whole run of the workload.

    String hashes are random per process unless PYTHONHASHSEED is set, and
    they decide how often a dict lookup collides: the same run differs by a
    few per cent from one seed to the next, so each count is taken with a
    given seed.
    """
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": str(seed)}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        + [os.path.realpath(sys.executable), str(WORKLOAD), str(rounds), kind],
        env=env,
        capture_output=True,
        check=True,
    )
    return int(COLLECTED.search(proc.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", action="append", type=Path, help="a pushsvc checkout")
    parser.add_argument("--rounds", type=int, default=40, help="reads of 100 lines each")
    parser.add_argument(
        "--kind",
        action="append",
        choices=("offline", "online", "spread", "connect", "cluster", "cluster-spread"),
        help="workloads",
    )
    parser.add_argument(
        "--connect-rounds", type=int, default=10, help="connect: 100 set-ups each, all held"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="hash seeds to run each count with (the median)"
    )
    args = parser.parse_args()
    checkouts = args.checkout or [HERE.parent]
    kinds = args.kind or ["offline", "online"]
    for kind in kinds:
        rounds = args.rounds if kind != "connect" else args.connect_rounds
        what = "connection set-up (held)" if kind == "connect" else f"{kind} push line"
        for checkout in checkouts:
            counts = sorted(
                (instructions(checkout, rounds, kind, seed) - instructions(checkout, 0, kind, seed))
                / (rounds * 100)
                for seed in range(args.seeds)
            )
            seeds = ", ".join(f"{c:,.0f}" for c in counts)
            median = counts[len(counts) // 2]
            sys.stdout.write(f"{checkout}: {median:,.0f} instructions per {what} ({seeds})\n")


if __name__ == "__main__":
    main()
