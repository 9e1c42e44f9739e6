"""Allocation races: while another process keeps attaching and detaching loop devices with
losetup (which takes no broker lock), every device the broker returns is bound to the file asked
for, and nothing leaks. Bounded in time (a few seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokerlab import Broker, bound_loops, make_image, settled_fd_count, wait_no_loops

pytestmark = pytest.mark.root

CHURN_SECONDS = 3.0

CHURN = r"""
import subprocess, sys, time
files, deadline = sys.argv[2:], time.monotonic() + float(sys.argv[1])
i = 0
while time.monotonic() < deadline:
    f = files[i % len(files)]; i += 1
    out = subprocess.run(["losetup", "-f", "--show", f], capture_output=True, text=True)
    dev = out.stdout.strip()
    if dev:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
print(i)
"""


def test_allocations_under_losetup_churn(broker: Broker, workdir: Path) -> None:
    churn_dir = workdir / "churn"
    churn_dir.mkdir()
    churn_files = [str(make_image(churn_dir / f"c{i}.img", 65536)) for i in range(3)]
    images = [make_image(broker.root / f"img{i}.img", 65536, bytes([65 + i])) for i in range(4)]
    idle = settled_fd_count(broker, -1, timeout=0.2)
    churners = [
        subprocess.Popen([sys.executable, "-c", CHURN, str(CHURN_SECONDS), *churn_files])
        for _ in range(2)
    ]
    client = broker.client()
    held: list[int] = []
    served = 0
    try:
        deadline = time.monotonic() + CHURN_SECONDS
        while time.monotonic() < deadline:
            image = images[served % len(images)]
            fd, ident = client.loop_file(str(image), writable=served % 2 == 0)
            held.append(fd)
            served += 1
            name = Path(f"/sys/dev/block/{ident.major}:{ident.minor}").resolve().name
            assert Path(f"/sys/block/{name}/loop/backing_file").read_text().strip() == str(image)
            assert int(Path(f"/sys/block/{name}/diskseq").read_text()) == ident.diskseq
            assert (ident.backing_dev, ident.backing_ino) == (
                image.stat().st_dev,
                image.stat().st_ino,
            )
            assert os.pread(fd, 1, 100) == bytes([65 + images.index(image)])
            if len(held) > 6:  # keep a few bound while new ones are allocated
                os.close(held.pop(0))
    finally:
        for fd in held:
            os.close(fd)
        client.close()
        for proc in churners:
            proc.wait(timeout=CHURN_SECONDS + 30)
        for f in churn_files:  # a churner stopped between attach and detach leaves one behind
            for line in subprocess.run(
                ["losetup", "-j", f], capture_output=True, text=True, check=False
            ).stdout.splitlines():
                subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
    assert served > 20, served
    assert wait_no_loops(broker.root) == [], "loop devices leaked"
    assert bound_loops(churn_dir) == []
    assert settled_fd_count(broker, idle) == idle, "the broker leaked an fd"
    retried = [line for line in broker.log_lines if "retries=" in line and "retries=0" not in line]
    print(f"served {served}, {len(retried)} needed a retry")  # informational: timing-dependent
