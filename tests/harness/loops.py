"""Leak checks: loop devices bound to given files or to files under given directories, and the
fds a process holds.

Test harness, runs as root. Scoped on purpose: other engineers' tests use loop devices on the
same machine at the same time, so only a test's own files and dirs count.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
DELETED_SUFFIX = " (deleted)"
# Closing the last fd of an AUTOCLEAR loop clears it asynchronously in the kernel (a workqueue),
# and a process closes an fd it sent just after its reply: both get this long to settle.
SETTLE_S = 5.0


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


def bound_to(path: Path) -> list[LoopDevice]:
    """Bound loop devices backed by exactly the file `path` (compared as a real path)."""
    real = os.path.realpath(path)
    return [loop for loop in bound_loops() if loop.backing_file == real]


def loops_of(path: Path) -> list[str]:
    """Names ("loop7") of the loop devices bound to the file `path`."""
    return [loop.name for loop in bound_to(path)]


def loops_released(path: Path, settle_s: float = SETTLE_S) -> bool:
    """True once no loop device is bound to `path`, waiting up to `settle_s` for autoclear."""
    deadline = time.monotonic() + settle_s
    while bound_to(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


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


def detach_all(path: Path) -> None:
    """Detach every loop device bound to the file `path` (a test's cleanup; errors ignored)."""
    for loop in bound_to(path):
        detach(loop)


def fd_count(pid: int | str = "self") -> int:
    """How many fds process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid: int, expected: int, timeout_s: float = SETTLE_S) -> int:
    """`pid`'s fd count once it equals `expected` (or the last count after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while (count := fd_count(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return count


def open_fds(pid: int | str = "self") -> list[str]:
    """What each open fd of `pid` refers to, sorted (a socket by its inode: numbers are reused,
    inodes not)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(targets)


def block_fds(pid: int) -> list[tuple[int, int]]:
    """major:minor of every block device `pid` holds an fd on, sorted."""
    held = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            st = os.stat(entry)
        except FileNotFoundError:
            continue
        if stat.S_ISBLK(st.st_mode):
            held.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
    return sorted(held)


def sysfs(name: str, attr: str) -> str:
    """A block device's sysfs attribute (/sys/block/NAME/ATTR), stripped."""
    return (SYS_BLOCK / name / attr).read_text().strip()
