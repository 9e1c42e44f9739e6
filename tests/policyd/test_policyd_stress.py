"""500 export/detach cycles while an external `losetup` churns loop devices on other files: every
export names a loop device bound to the right file with the reported diskseq, and nothing leaks.

Runs as root against the real stack; policyd runs as user blockbroker. Marked slow; it runs in
`make test` (well under a minute here).
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from harness.loops import loops_released
from harness.stack import Stack
from policydlab import Api, assert_clean, held_block_fds, ro

pytestmark = [pytest.mark.root, pytest.mark.daemon, pytest.mark.slow]

CYCLES = 500


class LosetupChurn(threading.Thread):
    """Binds and detaches loop devices on its own files, as another program on the host would."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.files:
                bound = subprocess.run(
                    ["losetup", "-f", "--show", str(path)], capture_output=True, text=True
                )
                if bound.returncode != 0:  # racing other engineers' tests for free devices
                    continue
                device = bound.stdout.strip()
                detached = subprocess.run(["losetup", "-d", device], capture_output=True)
                if detached.returncode != 0:
                    self.errors.append(f"losetup -d {device}: {detached.stderr!r}")
            self.rounds += 1


def test_export_detach_cycles_under_losetup_churn(stack: Stack, api: Api, tmp_path: Path) -> None:
    images = [stack.make_image(f"stress-{i}.img", content=f"STRESS-{i}".encode()) for i in range(3)]
    churn_files = []
    for i in range(2):
        path = tmp_path / f"churn-{i}.img"
        path.write_bytes(b"\0" * 65536)
        churn_files.append(path)
    churn = LosetupChurn(churn_files)
    churn.start()
    try:
        seen_diskseqs = set()
        for cycle in range(CYCLES):
            image = images[cycle % len(images)]
            options = {"read-only": ro(cycle % 5 != 0)}
            export = api.export(image, "work" if cycle % 2 else "untrusted", **options)
            props = api.props(export)
            loop = props["LoopDevice"].removeprefix("/dev/")
            sys_block = Path("/sys/block") / loop
            assert (sys_block / "loop/backing_file").read_text().strip() == str(image)
            assert int((sys_block / "diskseq").read_text()) == props["Diskseq"]
            assert stack.xs_read(f"{props['BackendPath']}/physical-device") == (
                f"{props['Major']:x}:{props['Minor']:x}"
            )
            assert props["Diskseq"] not in seen_diskseqs  # never a reused device identity
            seen_diskseqs.add(props["Diskseq"])
            api.detach(export)
            assert held_block_fds(stack) == []
    finally:
        churn.stop.set()
        churn.join()
    assert churn.rounds > 0 and churn.errors == []
    assert_clean(stack, *images)
    for path in churn_files:
        assert loops_released(path)
