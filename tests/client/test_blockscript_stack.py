"""blockbroker-block against the real stack, with the vbd nodes written as libxl writes them.

Runs as root with real daemons: the script's `add` must leave physical-device (and its trio) and
hotplug-status=connected (written by policyd's Attach in the trio's transaction; the script
itself writes nothing on success); a failing `add` must write hotplug-error, exit non-zero and
leak nothing; `remove` must release the loop device.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blockscript import BLOCK_SCRIPT
from harness.stack import Stack, StackConfig
from vbd import (
    XVDA,
    backend_path,
    block_script,
    cli_json,
    leaked_loops,
    libxl_vbds,
    loop_backing_file,
    loop_diskseq,
    loop_readonly,
    physical_device,
    remove_libxl_vbd,
    wait_loop_released,
    write_libxl_vbd,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

WORK = 1


@pytest.fixture
def vbd(stack: Stack) -> Iterator[Callable[..., str]]:
    """libxl-like nodes for (params, mode, devid); removed again after the test."""
    yield from libxl_vbds(stack, WORK)


def test_add_then_remove(stack: Stack, vbd: Callable[..., str]) -> None:
    image = stack.make_image("script-add.img", 1 << 20)
    be = vbd(str(image), "r")
    result = block_script(stack, "add", be)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    assert not stack.xs_exists(f"{be}/hotplug-error")
    loop = stack.xs_read(f"{be}/physical-device-path")
    assert loop is not None
    st = os.stat(loop)
    assert stack.xs_read(f"{be}/physical-device") == physical_device(
        os.major(st.st_rdev), os.minor(st.st_rdev)
    )
    diskseq = int(stack.xs_read(f"{be}/diskseq") or "", 16)
    assert loop_diskseq(loop) == diskseq
    assert loop_backing_file(loop) == str(image)
    assert loop_readonly(loop)
    (export,) = [e for e in cli_json(stack, "list") if e["backend_path"] == be]
    assert (export["loop_device"], export["diskseq"]) == (loop, diskseq)

    # libxl may run add twice; Attach is idempotent
    assert block_script(stack, "add", be).returncode == 0
    assert stack.xs_read(f"{be}/diskseq") == f"{diskseq:x}"

    result = block_script(stack, "remove", be)
    assert result.returncode == 0, result.stderr
    assert wait_loop_released(loop, diskseq)
    assert not stack.xs_exists(f"{be}/physical-device")
    assert not [e for e in cli_json(stack, "list") if e["backend_path"] == be]
    image.unlink()


def test_add_remove_with_libxl_relative_path(stack: Stack, vbd: Callable[..., str]) -> None:
    """libxl passes XENBUS_PATH relative to dom0's home: backend/vbd/<fe>/<devid>."""
    image = stack.make_image("script-relative.img", 1 << 20)
    be = vbd(str(image), "r", 51744)
    relative = be.removeprefix("/local/domain/0/")
    assert relative == f"backend/vbd/{WORK}/51744"
    result = block_script(stack, "add", relative)
    assert result.returncode == 0, result.stderr
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    loop = stack.xs_read(f"{be}/physical-device-path") or ""
    diskseq = int(stack.xs_read(f"{be}/diskseq") or "", 16)
    assert loop_backing_file(loop) == str(image)
    (export,) = [e for e in cli_json(stack, "list") if e["devid"] == 51744]
    assert export["backend_path"] == be  # shown absolute
    assert block_script(stack, "remove", relative).returncode == 0
    assert wait_loop_released(loop, diskseq)
    image.unlink()


def test_failing_add_with_relative_path_writes_hotplug_error(
    stack: Stack, vbd: Callable[..., str]
) -> None:
    be = vbd(str(stack.image_dir / "missing.img"), "r", 51760)
    result = block_script(stack, "add", be.removeprefix("/local/domain/0/"))
    assert result.returncode == 1
    assert (stack.xs_read(f"{be}/hotplug-error") or "").startswith("org.qubes.BlockBroker1.Error.")
    assert stack.xs_read(f"{be}/hotplug-status") == "error"


def test_attach_alone_writes_hotplug_status(stack: Stack, vbd: Callable[..., str]) -> None:
    """The script's success path relies on Attach writing hotplug-status=connected itself."""
    image = stack.make_image("attach-alone.img", 1 << 20)
    be = vbd(str(image), "r", 51824)
    attach = subprocess.run(
        [
            "dbus-send", "--system", "--print-reply=literal", "--dest=org.qubes.BlockBroker1",
            "/org/qubes/BlockBroker1", "org.qubes.BlockBroker1.Manager.Attach", f"string:{be}",
        ],
        env=stack.env(), capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert attach.returncode == 0, attach.stderr
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    assert stack.xs_exists(f"{be}/physical-device")
    assert not stack.xs_exists(f"{be}/hotplug-error")
    loop = stack.xs_read(f"{be}/physical-device-path") or ""
    diskseq = loop_diskseq(loop)
    assert block_script(stack, "remove", be).returncode == 0
    assert wait_loop_released(loop, diskseq)
    image.unlink()


def test_add_read_write(stack: Stack, vbd: Callable[..., str]) -> None:
    image = stack.make_image("script-rw.img", 1 << 20)
    be = vbd(str(image), "w", 51728)
    assert block_script(stack, "add", be).returncode == 0
    loop = stack.xs_read(f"{be}/physical-device-path") or ""
    assert not loop_readonly(loop)
    diskseq = loop_diskseq(loop)
    assert block_script(stack, "remove", be).returncode == 0
    assert wait_loop_released(loop, diskseq)
    image.unlink()


@pytest.mark.parametrize("case", ["missing", "outside-roots", "directory"])
def test_failing_add_writes_hotplug_error(
    stack: Stack, vbd: Callable[..., str], tmp_path: Path, case: str
) -> None:
    params = {
        "missing": str(stack.image_dir / "does-not-exist.img"),
        "outside-roots": str(tmp_path / "outside.img"),
        "directory": str(stack.image_dir),
    }[case]
    if case == "outside-roots":
        Path(params).write_bytes(b"\0" * 4096)
    be = vbd(params, "r")
    result = block_script(stack, "add", be)
    assert result.returncode == 1
    error = stack.xs_read(f"{be}/hotplug-error")
    assert error is not None
    assert error.startswith("org.qubes.BlockBroker1.Error.")
    assert error in result.stderr
    assert stack.xs_read(f"{be}/hotplug-status") == "error"
    for node in ("physical-device", "physical-device-path", "diskseq"):
        assert not stack.xs_exists(f"{be}/{node}")
    assert not [e for e in cli_json(stack, "list") if e["backend_path"] == be]
    assert leaked_loops(stack) == []
    # libxl runs remove after a failed add; nothing to release is not an error
    assert block_script(stack, "remove", be).returncode == 0


def test_hotplug_error_holds_backslashes_as_written(stack: Stack, vbd: Callable[..., str]) -> None:
    """xenstore-write decodes backslash escapes in a value; policyd's messages quote untrusted
    values with repr(), so a VM- or toolstack-written `\\x1b` must reach hotplug-error as those
    four printable characters, not as an ESC byte (the script doubles each backslash)."""
    image = stack.make_image("script-escape.img")
    be = vbd(str(image), "r")
    stack.xs_write(f"{be}/mode", "r\\x1b\\n")  # printable: backslash, x, 1, b, backslash, n
    result = block_script(stack, "add", be)
    assert result.returncode == 1
    error = stack.xs_read(f"{be}/hotplug-error") or ""
    assert "is invalid" in error and "\\\\x1b" in error, error  # repr doubled them once
    assert "\x1b" not in error and "\n" not in error
    assert error in result.stderr
    assert not stack.xs_exists(f"{be}/physical-device") and leaked_loops(stack) == []
    assert block_script(stack, "remove", be).returncode == 0


def test_hotplug_error_is_written_with_sigchld_ignored(
    stack: Stack, vbd: Callable[..., str]
) -> None:
    """A parent that ignores SIGCHLD (inherited across exec) must not stop the error path: the
    script resets it, or waitpid would fail and nothing would be written."""
    be = vbd(str(stack.image_dir / "absent-sigchld.img"), "r")
    env = stack.env()
    env.update(XENBUS_PATH=be, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    result = subprocess.run(
        [str(BLOCK_SCRIPT), "add"], env=env, capture_output=True, text=True, check=False,
        timeout=30, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN),
    )  # fmt: skip
    assert result.returncode == 1
    assert (stack.xs_read(f"{be}/hotplug-error") or "").startswith("org.qubes.BlockBroker1.")
    assert stack.xs_read(f"{be}/hotplug-status") == "error"
    assert not stack.xs_exists(f"{be}/physical-device") and leaked_loops(stack) == []


def test_add_with_missing_nodes_fails_cleanly(stack: Stack) -> None:
    be = backend_path(WORK, 51792)
    stack.xs_write(f"{be}/frontend-id", str(WORK))  # params and mode missing
    try:
        result = block_script(stack, "add", be)
        assert result.returncode == 1
        assert "org.qubes.BlockBroker1.Error.NotFound" in (
            stack.xs_read(f"{be}/hotplug-error") or ""
        )
    finally:
        stack.xs_rm(be)


def test_failing_add_does_not_recreate_a_removed_dir(stack: Stack) -> None:
    be = backend_path(WORK, 51808)
    result = block_script(stack, "add", be)
    assert result.returncode == 1
    assert not stack.xs_exists(be)


def test_remove_of_unknown_backend_succeeds(stack: Stack) -> None:
    result = block_script(stack, "remove", backend_path(WORK, 51776))
    assert result.returncode == 0, result.stderr
    assert not stack.xs_exists(backend_path(WORK, 51776))


def test_add_without_policyd_writes_hotplug_error(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    quiet = stack_factory(StackConfig(domains={"work": WORK}, policyd=False, broker=False))
    image = quiet.make_image("no-policyd.img", 4096)
    be = write_libxl_vbd(quiet, WORK, XVDA, str(image), "r")
    result = block_script(quiet, "add", be)
    assert result.returncode == 1
    error = quiet.xs_read(f"{be}/hotplug-error") or ""
    assert error.startswith("org.freedesktop.DBus.Error.ServiceUnknown:")
    assert quiet.xs_read(f"{be}/hotplug-status") == "error"
    remove_libxl_vbd(quiet, WORK, XVDA)
