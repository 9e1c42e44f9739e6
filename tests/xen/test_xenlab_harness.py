"""The Xen lab's own failure modes: when it cannot run, it says why and fails, never skips.

Test harness, runs as root on the host; no QEMU boot (these fail before one).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_LAB = REPO / "xenlab" / "run.sh"

pytestmark = [pytest.mark.xen, pytest.mark.root]


def run_lab(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUN_LAB), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_missing_qemu_fails_with_a_reason() -> None:
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root")
    proc = run_lab("stock", XENLAB_QEMU="/nonexistent/qemu-system-x86_64")
    assert proc.returncode != 0
    assert "XENLAB FATAL /nonexistent/qemu-system-x86_64 is missing" in proc.stdout


def test_unknown_scenario_fails_with_a_reason() -> None:
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root")
    proc = run_lab("no-such-scenario")
    assert proc.returncode != 0
    assert "XENLAB FATAL no scenario xenlab/scenarios/no-such-scenario.sh" in proc.stdout


def test_no_scenario_is_a_usage_error() -> None:
    proc = run_lab()
    assert proc.returncode != 0
    assert "usage:" in proc.stdout
