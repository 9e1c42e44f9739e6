"""Real Xen lane: Xen 4.17, a Linux PV dom0, xl, xenstored, blkback and PV guests under QEMU (TCG).

Test harness, runs as root on the host. The lab (xenlab/, docs/xenlab.md) is booted once per test
session with every scenario below; each scenario reports `XENLAB CHECK <name> PASS|FAIL <detail>`
lines, and each expected check is one test here. If the lab cannot be built or booted (no QEMU,
no package download), every test fails with that reason: this lane never skips silently.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.labchecks import parse_checks

REPO = Path(__file__).resolve().parents[2]
RUN_LAB = REPO / "xenlab" / "run.sh"

# scenario -> (time limit in seconds, the checks it must report)
SCENARIOS: dict[str, tuple[int, tuple[str, ...]]] = {
    "stock": (
        240,
        (
            "dom0-xenstored",
            "stock-block-guest-reads",
            "stock-block-loop-freed",
            "host-venv-pyxs",
        ),
    ),
    "blockbroker": (
        900,
        (
            "bb-stack-up",
            "bb-script-guest-reads",
            "bb-script-destroy-frees-loop",
            "bb-export-guest-reads",
            "bb-export-state-connected",
            "bb-shared-second-guest-reads",
            "bb-shared-one-loop",
            "bb-detach-one-keeps-other",
            "bb-detach-all-frees-loop",
            "bb-race-right-bytes",
            "bb-destroy-detaches-export",
            "bb-restart-up",
            "bb-restart-listed",
            "bb-restart-guest-reads",
            "bb-restart-detach-cli",
            "bb-restart-shared-one-loop",
            "bb-restart-rw-refused",
            "bb-restart-detach-libxl",
            "bb-restart-destroy-detaches",
            "bb-restart-no-loop",
        ),
    ),
    "vmexport": (
        150,
        (
            "vm-export-stack-up",
            "vm-export-driver-loop",
            "vm-export-stale-diskseq-refused",
            "vm-export-request-approved",
            "vm-export-target-reads",
        ),
    ),
    # real LVM thin volumes in dom0 (device-mapper identity): xenlab/scenarios/dmlvm.sh
    "dmlvm": (
        300,
        (
            "dm-lvm-thin-volumes",
            "dm-stack-up",
            "dm-script-guest-reads",
            "dm-export-guest-reads",
            "dm-renamed-refused",
            "dm-recreated-refused",
            "dm-nothing-leaks",
        ),
    ),
}

pytestmark = [pytest.mark.xen, pytest.mark.root]


@dataclass
class LabRun:
    """One boot of the lab: its exit status, output and the checks its scenarios reported."""

    returncode: int
    output: str
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)

    def failure_context(self) -> str:
        tail = "\n".join(self.output.splitlines()[-25:])
        return f"xenlab/run.sh exited {self.returncode}; last output:\n{tail}"


def run_lab() -> LabRun:
    argv = [str(RUN_LAB)] + [f"{name}={limit}" for name, (limit, _) in SCENARIOS.items()]
    budget = sum(limit for limit, _ in SCENARIOS.values()) + 600  # + build and boot
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=budget, check=False, cwd=REPO
        )
    except subprocess.TimeoutExpired as exc:
        return LabRun(returncode=-1, output=f"xenlab/run.sh did not finish in {budget}s: {exc}")
    lab = LabRun(returncode=proc.returncode, output=proc.stdout + proc.stderr)
    lab.checks = parse_checks(proc.stdout)
    return lab


@pytest.fixture(scope="session")
def lab() -> LabRun:
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root")
    return run_lab()


def test_lab_completed(lab: LabRun) -> None:
    """dom0 booted, ran every scenario to its end and reported no failure."""
    assert lab.returncode == 0, lab.failure_context()


@pytest.mark.parametrize("check", [check for _, checks in SCENARIOS.values() for check in checks])
def test_check(lab: LabRun, check: str) -> None:
    assert check in lab.checks, f"check {check} was never reported. {lab.failure_context()}"
    status, detail = lab.checks[check]
    assert status == "PASS", f"{check}: {detail}"
