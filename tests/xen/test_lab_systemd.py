"""Real Xen lane, second dom0: the Debian package under systemd as PID 1 (`make lab-systemd`).

Test harness, runs as root on the host. `make lab-systemd` builds the package twice from this
tree (as is, and as version <version>+next for the upgrade), the systemd dom0 image if its
inputs changed (mmdebstrap from Debian's archive, xenlab/build-systemd.sh), boots it under QEMU
and runs xenlab/scenarios/systemd.sh (docs/xenlab.md, "The systemd dom0"). Each expected
`XENLAB CHECK sd-...` line is one test here, and the run must end with `LAB-SYSTEMD OK`. If the
packages, the image or the boot fail, every test fails with that reason: this lane never skips
(except without root, which CI=true turns into a failure).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.labchecks import parse_checks

REPO = Path(__file__).resolve().parents[2]

# the checks scenarios/systemd.sh must report, in its order
CHECKS = (
    "sd-pid1-systemd",
    "sd-xen-units",
    "sd-apt-install",
    "sd-units-verify",
    "sd-units-man-pages",
    "sd-security-broker",
    "sd-security-policyd",
    "sd-script-guest-reads",
    "sd-broker-socket-activated",
    "sd-policyd-dbus-activated",
    "sd-destroy-frees-loop",
    "sd-block-socket",
    "sd-export-guest-reads",
    "sd-kill-policyd-back",
    "sd-kill-policyd-listed",
    "sd-kill-policyd-guest-reads",
    "sd-kill-broker-back",
    "sd-upgrade-second-guest",
    "sd-upgrade-installed",
    "sd-upgrade-fd-store",
    "sd-upgrade-listed",
    "sd-upgrade-guests-read",
    "sd-upgrade-destroy-frees-loop",
    "sd-detach",
    "sd-vmexport-approved",
    "sd-vmexport-target-reads",
    "sd-remove-refused",
    "sd-apt-purge",
)
# two package builds (~1 min), the image if it changed (~1.5 min), the run (~5 min), margin
BUDGET_S = 1800

pytestmark = [pytest.mark.xen, pytest.mark.root]


@dataclass
class LabRun:
    """One `make lab-systemd`: its exit status, output, verdict line and reported checks."""

    returncode: int
    output: str
    seconds: float
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)

    def verdict(self) -> str:
        lines = [line for line in self.output.splitlines() if line.startswith("LAB-SYSTEMD ")]
        return lines[-1] if lines else "(no LAB-SYSTEMD line)"

    def failure_context(self) -> str:
        tail = "\n".join(self.output.splitlines()[-25:])
        return (
            f"make lab-systemd exited {self.returncode} after {self.seconds:.0f} s; "
            f"last output:\n{tail}"
        )


@pytest.fixture(scope="session")
def lab() -> LabRun:
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            ["make", "--no-print-directory", "lab-systemd"],
            capture_output=True,
            text=True,
            timeout=BUDGET_S,
            check=False,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired as exc:
        return LabRun(-1, f"make lab-systemd did not finish in {BUDGET_S}s: {exc}", BUDGET_S)
    run = LabRun(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)
    run.checks = parse_checks(proc.stdout)
    return run


def test_lab_systemd_ok(lab: LabRun) -> None:
    """Both packages built, dom0 booted, every check ran and passed: `LAB-SYSTEMD OK` last."""
    assert lab.returncode == 0 and lab.verdict() == "LAB-SYSTEMD OK", lab.failure_context()


@pytest.mark.parametrize("check", CHECKS)
def test_check(lab: LabRun, check: str) -> None:
    assert check in lab.checks, f"check {check} was never reported. {lab.failure_context()}"
    status, detail = lab.checks[check]
    assert status == "PASS", f"{check}: {detail}"
