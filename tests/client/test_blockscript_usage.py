"""Unit: blockbroker-block refuses bad invocations with status 2 and touches nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from blockscript import BLOCK_SCRIPT


@pytest.mark.parametrize(
    ("argv", "xenbus_path", "message"),
    [
        (["add"], None, "XENBUS_PATH must be a backend path"),
        (["add"], "/etc/passwd", "XENBUS_PATH must be a backend path"),
        (["add"], "frontend/vbd/1/51712", "XENBUS_PATH must be a backend path"),
        (["online"], "/local/domain/0/backend/vbd/1/51712", "unknown command 'online'"),
        ([], "/local/domain/0/backend/vbd/1/51712", "unknown command ''"),
    ],
)
def test_usage(argv: list[str], xenbus_path: str | None, message: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/none"}
    if xenbus_path is not None:
        env["XENBUS_PATH"] = xenbus_path
    result = subprocess.run(
        [str(BLOCK_SCRIPT), *argv], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""


def test_is_posix_sh() -> None:
    assert BLOCK_SCRIPT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["dash", "-n", str(BLOCK_SCRIPT)], check=True)
