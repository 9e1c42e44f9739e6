"""Helpers of the restart and reconciliation tests: the installed CLI and block script against
a stack. Test code, runs as root."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from harness.stack import Stack

VENV = Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
XVDK = 51872  # xvdk: the devid of the libxl (Attach) backends in these tests


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV / "bin/blockbroker"), *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def listing(stack: Stack) -> dict[str, dict[str, Any]]:
    """`blockbroker list --json`, by object path."""
    done = cli(stack, "list", "--json")
    assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
    return {e["export"]: e for e in map(json.loads, done.stdout.splitlines())}


def export(stack: Stack, image: Path, to: str = "work", *opts: str) -> dict[str, Any]:
    done = cli(stack, "export", str(image), "--to", to, "--json", *opts)
    assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
    (exported,) = [json.loads(line) for line in done.stdout.splitlines()]
    return dict(exported)


def block_script(stack: Stack, command: str, backend: str) -> subprocess.CompletedProcess[str]:
    """blockbroker-block as libxl runs it: add|remove, XENBUS_* in the environment."""
    env = stack.env()
    env.update(XENBUS_PATH=backend, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    return subprocess.run(
        [str(VENV / "bin/blockbroker-block"), command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
