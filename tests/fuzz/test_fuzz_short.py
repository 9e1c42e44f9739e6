"""A short `make fuzz` (2000 runs per target) inside the normal test run: every target builds,
starts from its seeds, and survives a first round of mutation; the FUZZ summary is well-formed.
The runs at scale are `make fuzz` (docs/fuzzing.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fuzzrun import ALL_TARGETS, HERE

RUNS = 2000


@pytest.mark.fuzz
def test_short_fuzz_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzzrun.py"),
            f"--runs={RUNS}",
            f"--workdir={tmp_path / 'work'}",
            f"--regressions={tmp_path / 'regressions'}",  # the tree is not written to here
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FUZZ "), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(last[len("FUZZ ") :])
    assert summary["crashes"] == 0, proc.stdout[-6000:]
    assert proc.returncode == 0
    assert summary["targets"] == ALL_TARGETS
    assert all(summary["runs"][t] >= RUNS for t in ALL_TARGETS), summary["runs"]
    assert summary["seconds"] < 120
