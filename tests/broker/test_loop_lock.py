"""The loop-control lock is held while the broker allocates, and free while it backs off.

bind_free_loop runs in this process against a stand-in lock file (flock works on any file the
same way) with LOOP_CTL_GET_FREE failing with EBUSY every time, as when another allocator keeps
taking the free device: at each attempt another process must find the lock taken, and at each
back-off free. No root, no loop device is touched.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker import kernel, ops
from broker.protocol import ErrorCode


def lock_is_free(path: Path) -> bool:
    """Whether another process can take the lock now (util-linux flock, non-blocking)."""
    return subprocess.run(["flock", "--nonblock", str(path), "true"], check=False).returncode == 0


def test_lock_is_released_during_each_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_path = tmp_path / "loop-control"
    lock_path.touch()
    allocator = object.__new__(ops.Operations)  # only loop_control is used by bind_free_loop
    allocator.loop_control = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    free_while_allocating: list[bool] = []
    free_while_sleeping: list[bool] = []

    def busy_ioctl(fd: int, request: int, *args: Any) -> int:
        assert (fd, request) == (allocator.loop_control, kernel.LOOP_CTL_GET_FREE)
        free_while_allocating.append(lock_is_free(lock_path))
        raise OSError(errno.EBUSY, "taken by another allocator")

    monkeypatch.setattr(ops.fcntl, "ioctl", busy_ioctl)
    monkeypatch.setattr(
        ops.time, "sleep", lambda _: free_while_sleeping.append(lock_is_free(lock_path))
    )
    try:
        with pytest.raises(ops.OpError) as raised:
            allocator.bind_free_loop(kernel.loop_config(), writable=False)
    finally:
        os.close(allocator.loop_control)
    assert raised.value.code == ErrorCode.LOOP_BUSY
    assert free_while_allocating == [False] * ops.LOOP_ATTEMPTS
    assert free_while_sleeping == [True] * ops.LOOP_ATTEMPTS
