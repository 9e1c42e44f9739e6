"""A short chaos run (bench/chaos.py, systemd mode): random client work while policyd and the
broker, units of a real systemd 252 user manager, are SIGKILLed (systemd restarts policyd and
hands back its fd store; the broker's socket starts a new one) and block scripts are killed,
with hostile loop-device users; every invariant count is 0.

Test code, runs as root against the real host stack (the script starts its own). The counts are
in the last stdout line, `CHAOS {json}`; the script's stderr (each invariant break) is shown
when the test fails. About 15 s on the 2-core machine (500 cycles, ~15 kills).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.daemon]

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


def test_short_chaos_run_under_systemd_keeps_every_invariant() -> None:
    env = {**os.environ, "BLOCKBROKER_VENV": str(VENV)}
    python = VENV / "bin" / "python"
    result = subprocess.run(
        [str(python if python.exists() else sys.executable), str(CHAOS), "--mode", "systemd",
         "--cycles", "500", "--max-seconds", "45", "--kill-interval", "0.3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("CHAOS "), result.stderr[-4000:]
    counts = json.loads(lines[-1].removeprefix("CHAOS "))
    assert counts["mode"] == "systemd", counts
    assert counts["cycles"] >= 500 or counts["chaos_seconds"] >= 45, counts
    assert counts["kills_by_kind"].get("policyd", 0) > 0, counts
    # every restart of policyd took its fds back from systemd's store and adopted exports
    assert counts["reconciled"].get("stored_fds", 0) > 0, counts
    broken = {name: counts[name] for name in INVARIANTS if counts[name]}
    breaks = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("chaos ") and not line.startswith("chaos progress")
    ]
    assert broken == {}, "\n".join([json.dumps(counts), *breaks[-60:]])
    assert counts["unclaimed_exports"] == 0, counts
    assert counts["teardown_problems"] == [], counts
    assert result.returncode == 0, result.stderr[-4000:]
