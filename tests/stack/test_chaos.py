"""A short chaos run (bench/chaos.py): random client work while policyd, the broker and block
scripts are SIGKILLed and restarted, with hostile loop-device users; every invariant count is 0.

Runs as root against the real host stack (the script starts its own). The counts are in the
last stdout line, `CHAOS {json}`; the script's stderr (progress, each invariant break) is shown
when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.daemon, pytest.mark.slow]

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
VENV = Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
INVARIANTS = (
    "wrong_device",
    "leaked_loops",
    "lost_exports",
    "lost_while_running",
    "duplicate_loops",
    "rw_while_shared",
)


def test_short_chaos_run_keeps_every_invariant() -> None:
    env = {**os.environ, "BLOCKBROKER_VENV": str(VENV)}
    python = VENV / "bin" / "python"
    result = subprocess.run(
        [str(python if python.exists() else sys.executable), str(CHAOS), "--cycles", "500",
         "--max-seconds", "240", "--kill-interval", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("CHAOS "), result.stderr[-4000:]
    counts = json.loads(lines[-1].removeprefix("CHAOS "))
    assert counts["cycles"] >= 500 or counts["seconds"] >= 240, counts
    assert counts["kills"] > 0, counts
    broken = {name: counts[name] for name in INVARIANTS if counts[name]}
    breaks = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("chaos ") and not line.startswith("chaos progress")
    ]
    assert broken == {}, "\n".join([json.dumps(counts), *breaks[-60:]])
    assert counts["teardown_problems"] == [], counts
    assert result.returncode == 0, result.stderr[-4000:]
