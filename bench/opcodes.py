"""Python opcodes per push line, by function: where a workload's interpreted work goes.

Runs a ``bench/instructions_workload.py`` workload twice under
``sys.settrace`` with ``f_trace_opcodes`` (5 and 15 reads of 100 lines, each
in a fresh process with ``PYTHONHASHSEED=0``) and prints the difference per
line, for the whole workload and for each function.  C work (orjson,
hiredis, the system calls) is not in these counts: ``bench/instructions.py``
counts everything, this says which Python function it is spent in.

    python bench/opcodes.py --kind online
    python bench/opcodes.py --kind cluster --top 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROUNDS = (5, 15)


def count(rounds: int, kind: str, out: Path) -> None:
    """In a child process: run the workload under the tracer, write the counts to ``out``."""
    sys.path.insert(0, str(HERE))
    import instructions_workload as workload

    counts: Counter[str] = Counter()
    root = str(HERE.parent) + os.sep

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        where = code.co_filename.split("site-packages" + os.sep)[-1].replace(root, "")
        key = f"{where}:{code.co_qualname}"

        def opcode(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return opcode

        return opcode

    sys.argv = ["instructions_workload.py", str(rounds), kind]
    sys.settrace(trace)
    try:
        workload.main()
    finally:
        sys.settrace(None)
    out.write_text(json.dumps(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="online", help="a workload of instructions_workload.py")
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    parser.add_argument("--child", nargs=2, metavar=("ROUNDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        count(int(args.child[0]), args.kind, Path(args.child[1]))
        return
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rounds in ROUNDS:
            out = Path(tmp) / f"{rounds}.json"
            argv = [sys.executable, __file__, "--kind", args.kind, "--child", str(rounds), str(out)]
            subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    lines = (ROUNDS[1] - ROUNDS[0]) * 100
    few, many = runs
    per_line = {k: (n - few.get(k, 0)) / lines for k, n in many.items()}
    print(f"{args.kind}: {sum(per_line.values()):,.0f} Python opcodes per push line")
    for key, n in sorted(per_line.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{n:8.1f}  {key}")


if __name__ == "__main__":
    main()
