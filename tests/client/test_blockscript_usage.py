"""Unit: blockbroker-block refuses bad invocations with status 2 and touches nothing; the installed
file is a static ELF built from this repo's source with the Makefile's flags."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from blockscript import BLOCK_SCRIPT, build, makefile_cflags
from hypothesis import given, settings
from hypothesis import strategies as st

VALID = "/local/domain/0/backend/vbd/1/51712"


def run(
    argv: list[str], xenbus_path: str | None, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/none"}
    if xenbus_path is not None:
        env["XENBUS_PATH"] = xenbus_path
    return subprocess.run(
        [str(BLOCK_SCRIPT), *argv],
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        check=False,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("argv", "xenbus_path", "message"),
    [
        (["add"], None, "XENBUS_PATH must be a backend path"),
        (["add"], "", "XENBUS_PATH must be a backend path"),
        (["add"], "/etc/passwd", "XENBUS_PATH must be a backend path"),
        (["add"], "frontend/vbd/1/51712", "XENBUS_PATH must be a backend path"),
        (["add"], "/local/domain/backend/vbd", "XENBUS_PATH must be a backend path"),
        (["add"], "backend", "XENBUS_PATH must be a backend path"),
        (["add"], "/local/domain/0/backend", "XENBUS_PATH must be a backend path"),
        (["add"], "backend/" + "x" * 600, "XENBUS_PATH is longer than 512 bytes"),
        (["add"], "backend/vbd/1/51712\n", "not printable ASCII"),
        (["add"], "backend/vbd/1/\x1b[2J", "not printable ASCII"),
        (["add"], "backend/vbd/1/\u00e9", "not printable ASCII"),
        (["online"], VALID, "unknown command 'online'"),
        (["ADD"], VALID, "unknown command 'ADD'"),
        (["add\x1b"], VALID, "unknown command 'add?'"),
        ([], VALID, "unknown command ''"),
    ],
)
def test_usage(argv: list[str], xenbus_path: str | None, message: str, tmp_path: Path) -> None:
    result = run(argv, xenbus_path, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""
    assert "\x1b" not in result.stderr


def sh_accepts(xenbus_path: str) -> bool:
    """The previous shell script's check, run by dash itself."""
    case = 'case "$1" in /local/domain/*/backend/* | backend/*) exit 0 ;; *) exit 1 ;; esac'
    return subprocess.run(["dash", "-c", case, "sh", xenbus_path], check=False).returncode == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["/", "local", "domain", "backend", "0", "vbd", "x", "*", "/local/domain/"]
        ),
        max_size=7,
    ).map("".join)
)
def test_path_check_is_the_sh_case_pattern(xenbus_path: str) -> None:
    """`backend/*` or `/local/domain/*/backend/*` exactly as sh's case matched them (STAR matches
    any string, slashes and the empty string included)."""
    result = subprocess.run(
        [str(BLOCK_SCRIPT), "add"],
        env={"XENBUS_PATH": xenbus_path, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    refused = result.returncode == 2 and "must be a backend path" in result.stderr
    assert refused != sh_accepts(xenbus_path), (xenbus_path, result.returncode, result.stderr)


def elf_program_header_types(binary: Path) -> set[int]:
    data = binary.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}


def test_is_a_static_elf_built_from_the_repo_source(tmp_path: Path) -> None:
    """No interpreter and no dynamic section (nothing to load before main), and byte for byte
    what the Makefile's gcc line makes of src/client/blockbroker-block.c: the installed copy is
    not stale (the install is non-editable: after editing the source, run make install)."""
    pt_dynamic, pt_interp = 2, 3
    types = elf_program_header_types(BLOCK_SCRIPT)
    assert pt_interp not in types and pt_dynamic not in types, types
    fresh = build(tmp_path / "blockbroker-block", makefile_cflags())
    assert fresh.read_bytes() == BLOCK_SCRIPT.read_bytes(), "installed binary is stale"
