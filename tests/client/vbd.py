"""Helpers for the client's stack tests: libxl-like vbd nodes, loop devices in sysfs, the CLI.

Test code, runs as root against the harness stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import loops, xenstore
from harness.stack import Stack

VENV = Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
CLI = VENV / "bin" / "blockbroker"
BLOCK_SCRIPT = VENV / "bin" / "blockbroker-block"
XVDA = 51712  # xvda's device number (202 << 8)


def cli(stack: Stack, *args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `blockbroker` against the stack; `user` runs it under another uid."""
    argv = [str(CLI), *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(
        argv, env=stack.env(), capture_output=True, text=True, check=False, timeout=60
    )


def cli_json(stack: Stack, *args: str) -> list[dict[str, Any]]:
    result = cli(stack, *args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def block_script(stack: Stack, command: str, backend: str) -> subprocess.CompletedProcess[str]:
    """Run blockbroker-block as libxl does: $1 add|remove, XENBUS_* in the environment."""
    env = stack.env()
    env.update(XENBUS_PATH=backend, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    return subprocess.run(
        [str(BLOCK_SCRIPT), command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def backend_path(frontend_domid: int, devid: int, backend_domid: int = 0) -> str:
    return f"/local/domain/{backend_domid}/backend/vbd/{frontend_domid}/{devid}"


def frontend_path(frontend_domid: int, devid: int) -> str:
    return f"/local/domain/{frontend_domid}/device/vbd/{devid}"


def write_libxl_vbd(stack: Stack, frontend_domid: int, devid: int, params: str, mode: str) -> str:
    """The nodes libxl's device_disk_add writes for `disk=[...,script=blockbroker-block]`."""
    return xenstore.write_libxl_vbd(stack.xs, frontend_domid, devid, params, mode)


def remove_libxl_vbd(stack: Stack, frontend_domid: int, devid: int) -> None:
    """What libxl does after the script's `remove`: delete both dirs."""
    for path in (backend_path(frontend_domid, devid), frontend_path(frontend_domid, devid)):
        if stack.xs_exists(path):
            stack.xs_rm(path)


def loop_name(device: str) -> str:
    assert device.startswith("/dev/loop"), device
    return device.removeprefix("/dev/")


def loop_backing_file(device: str) -> str | None:
    try:
        return loops.sysfs(loop_name(device), "loop/backing_file")
    except FileNotFoundError:
        return None


def loop_diskseq(device: str) -> int:
    return int(loops.sysfs(loop_name(device), "diskseq"))


def loop_readonly(device: str) -> bool:
    return loops.sysfs(loop_name(device), "ro") == "1"


def wait_loop_released(device: str, diskseq: int, timeout: float = 5.0) -> bool:
    """True once `device` no longer carries `diskseq` bound (autoclear ran on the last close)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if loop_backing_file(device) is None or loop_diskseq(device) != diskseq:
            return True
        time.sleep(0.01)
    return False


def physical_device(major: int, minor: int) -> str:
    return f"{major:x}:{minor:x}"


def libxl_vbds(stack: Stack, frontend_domid: int) -> Iterator[Callable[..., str]]:
    """For a fixture: make(params, mode="r", devid=XVDA) writes libxl-like nodes and returns
    the backend path; afterwards every one is removed and no loop device may be left."""
    made: list[int] = []

    def make(params: str, mode: str = "r", devid: int = XVDA) -> str:
        made.append(devid)
        return write_libxl_vbd(stack, frontend_domid, devid, params, mode)

    yield make
    for devid in made:
        remove_libxl_vbd(stack, frontend_domid, devid)
    assert leaked_loops(stack) == []


def leaked_loops(stack: Stack) -> list[loops.LoopDevice]:
    """Loops still bound under the stack's dirs once autoclear had time to run (a detached
    export's loop is freed asynchronously after policyd closes its fd)."""
    return loops.leaked_loops(stack.leak_roots(), settle_s=2.0)
