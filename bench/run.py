"""Benchmark runner for `make bench` (runs as root; measurement only, never a pass/fail test).

Runs every bench/bench_*.py (or those named on the command line) in its own process, in name
order, shows their output as it comes, and collects the line each prints last:
`BENCH_RESULT <json object>`.
Ends with one line `BENCH_ALL <json>` holding every figure, keyed by script name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "BENCH_RESULT "


def run_one(script: Path) -> dict[str, object]:
    print(f"== {script.name}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    assert proc.stdout is not None
    result: dict[str, object] = {}
    for line in proc.stdout:
        if line.startswith(PREFIX):
            result = json.loads(line[len(PREFIX) :])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        result = {"error": f"exit status {proc.returncode}"}
    return result


def main(argv: list[str]) -> int:
    scripts = [HERE / a for a in argv] if argv else sorted(HERE.glob("bench_*.py"))
    results = {s.stem: run_one(s) for s in scripts}
    print("BENCH_ALL " + json.dumps(results, sort_keys=True))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
