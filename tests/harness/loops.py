"""Loop devices whose backing file lies under given directories (the stack's leak check).

Test harness, runs as root. Scoped on purpose: other engineers' tests use loop devices on the
same machine at the same time, so only files under the stack's own dirs count.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
DELETED_SUFFIX = " (deleted)"


@dataclass(frozen=True)
class LoopDevice:
    name: str  # "loop7"
    backing_file: str
    autoclear: bool

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def bound_loops() -> list[LoopDevice]:
    loops = []
    for entry in SYS_BLOCK.glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().rstrip("\n")
            autoclear = (entry / "loop" / "autoclear").read_text().strip() == "1"
        except OSError:  # not bound (no loop/ attributes), or unbound while we looked
            continue
        loops.append(LoopDevice(entry.name, backing, autoclear))
    return loops


def _under(path: str, roots: list[Path]) -> bool:
    if path.endswith(DELETED_SUFFIX):
        path = path[: -len(DELETED_SUFFIX)]
    return any(path == str(root) or path.startswith(str(root).rstrip("/") + "/") for root in roots)


def loops_under(roots: list[Path]) -> list[LoopDevice]:
    """Bound loop devices backed by a file under one of `roots` (compared as real paths)."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    return [loop for loop in bound_loops() if _under(loop.backing_file, real_roots)]


def leaked_loops(roots: list[Path], settle_s: float) -> list[LoopDevice]:
    """Loops under `roots` that stay bound. An autoclear loop whose last holder just exited may
    still be in rundown (fds in flight in unix sockets are released by the socket garbage
    collector), so those get up to `settle_s` to disappear; any other bound loop is a leak."""
    deadline = time.monotonic() + settle_s
    while True:
        found = loops_under(roots)
        if not any(loop.autoclear for loop in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def detach(loop: LoopDevice) -> str | None:
    """Detach a leaked loop so it does not pollute the machine; returns an error text if any."""
    result = subprocess.run(
        ["losetup", "-d", loop.path], capture_output=True, text=True, check=False
    )
    return result.stderr.strip() or None if result.returncode != 0 else None
