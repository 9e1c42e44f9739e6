"""blockbroker-block on the real stack through both of its paths: policyd's block socket (the
stack starts policyd with --block-socket and puts BLOCKBROKER_BLOCK_SOCKET in its env) and, when
that is absent or busy, D-Bus. Either way `add` leaves the physical-device trio and
hotplug-status=connected, a failing `add` writes the same hotplug-error, `remove` releases the
loop, and a remove policyd does not know is success.

Runs as root with real daemons.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blockscript import BLOCK_SCRIPT
from harness.stack import Stack
from vbd import (
    XVDA,
    backend_path,
    libxl_vbds,
    loop_backing_file,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

WORK = 1
NO_BUS = "unix:path=/nonexistent/system_bus_socket"  # only the block socket can answer
MAX_CONNECTIONS = 64  # policyd.bus.blocksocket.MAX_CONNECTIONS


def script(stack: Stack, command: str, be: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = stack.env()
    full.update(XENBUS_PATH=be, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend", **env)
    return subprocess.run(
        [str(BLOCK_SCRIPT), command], env=full, capture_output=True, text=True, timeout=30
    )


def via_socket(stack: Stack) -> int:
    """How many policyd log lines name a block-socket caller so far."""
    text = (stack.stack_dir / "policyd.log").read_text(errors="replace")
    return text.count("via=block-socket")


@pytest.fixture
def vbd(stack: Stack) -> Iterator[Callable[..., str]]:
    """libxl-like nodes for (params, mode, devid); removed again after the test."""
    yield from libxl_vbds(stack, WORK)


def add_then_remove(stack: Stack, be: str, image: Path, **env: str) -> None:
    result = script(stack, "add", be, **env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    loop = stack.xs_read(f"{be}/physical-device-path")
    assert loop is not None and loop_backing_file(loop) == str(image)
    assert script(stack, "add", be, **env).returncode == 0  # libxl may run add twice
    result = script(stack, "remove", be, **env)
    assert (result.returncode, result.stderr) == (0, "")
    assert not stack.xs_exists(f"{be}/physical-device")
    result = script(stack, "remove", be, **env)  # unknown to policyd now: success
    assert (result.returncode, result.stderr) == (0, "")


def test_block_socket_alone(stack: Stack, vbd: Callable[..., str]) -> None:
    """With no bus to reach, only the block socket can have answered."""
    image = stack.make_image("direct.img", 1 << 20)
    before = via_socket(stack)
    add_then_remove(stack, vbd(str(image), "w"), image, DBUS_SYSTEM_BUS_ADDRESS=NO_BUS)
    assert via_socket(stack) > before


def test_relative_path_on_the_block_socket(stack: Stack, vbd: Callable[..., str]) -> None:
    image = stack.make_image("direct-relative.img", 1 << 20)
    be = vbd(str(image), "r")
    add_then_remove(
        stack, be.removeprefix("/local/domain/0/"), image, DBUS_SYSTEM_BUS_ADDRESS=NO_BUS
    )


@pytest.mark.parametrize("socket_path", ["/nonexistent/block.sock", ""])
def test_dbus_fallback_without_the_socket(
    stack: Stack, vbd: Callable[..., str], socket_path: str
) -> None:
    image = stack.make_image("fallback.img", 1 << 20)
    before = via_socket(stack)
    add_then_remove(stack, vbd(str(image), "r"), image, BLOCKBROKER_BLOCK_SOCKET=socket_path)
    assert via_socket(stack) == before


def test_dbus_fallback_with_a_stale_socket(
    stack: Stack, vbd: Callable[..., str], tmp_path: Path
) -> None:
    """A socket file nobody listens on (policyd gone): ECONNREFUSED, then D-Bus."""
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(stale))
    sock.close()
    image = stack.make_image("stale.img", 1 << 20)
    add_then_remove(stack, vbd(str(image), "r"), image, BLOCKBROKER_BLOCK_SOCKET=str(stale))


def test_dbus_fallback_when_policyd_is_busy(stack: Stack, vbd: Callable[..., str]) -> None:
    """policyd's block socket at its connection limit: the script's request is not read, and
    the script uses D-Bus."""
    image = stack.make_image("busy.img", 1 << 20)
    be = vbd(str(image), "r")
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(str(stack.block_socket))
            held.append(sock)
        before = via_socket(stack)
        result = script(stack, "add", be)
        assert (result.returncode, result.stderr) == (0, "")
        assert stack.xs_read(f"{be}/hotplug-status") == "connected"
        assert via_socket(stack) == before  # answered over D-Bus
    finally:
        for sock in held:
            sock.close()
    assert script(stack, "remove", be).returncode == 0


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_failing_add_reports_the_same_on_both_paths(
    stack: Stack, vbd: Callable[..., str], case: str
) -> None:
    params = {
        "missing": str(stack.image_dir / "direct-missing.img"),
        "directory": str(stack.image_dir),
    }[case]
    errors = []
    for devid, env in ((XVDA, {"DBUS_SYSTEM_BUS_ADDRESS": NO_BUS}),
                       (XVDA + 16, {"BLOCKBROKER_BLOCK_SOCKET": ""})):  # fmt: skip
        be = vbd(params, "r", devid)
        result = script(stack, "add", be, **env)
        assert result.returncode == 1
        error = stack.xs_read(f"{be}/hotplug-error")
        assert error is not None and error.startswith("org.qubes.BlockBroker1.Error.")
        assert error in result.stderr
        assert stack.xs_read(f"{be}/hotplug-status") == "error"
        assert not stack.xs_exists(f"{be}/physical-device")
        assert script(stack, "remove", be, **env).returncode == 0
        errors.append(error.replace(str(devid), "<devid>"))
    assert errors[0] == errors[1]


def test_remove_of_unknown_backend_on_the_socket(stack: Stack) -> None:
    result = script(stack, "remove", backend_path(WORK, 51776), DBUS_SYSTEM_BUS_ADDRESS=NO_BUS)
    assert (result.returncode, result.stderr) == (0, "")


def test_script_keeps_no_fd_in_policyd(stack: Stack, vbd: Callable[..., str]) -> None:
    pid = stack.daemons["policyd"].pid if "policyd" in stack.daemons else None
    if pid is None:
        pytest.skip("policyd runs under systemd here")
    before = len(os.listdir(f"/proc/{pid}/fd"))
    for _ in range(5):
        result = script(stack, "remove", backend_path(WORK, 51776), DBUS_SYSTEM_BUS_ADDRESS=NO_BUS)
        assert result.returncode == 0
    deadline = time.monotonic() + 5  # a connection's fd goes just after its reply
    while len(os.listdir(f"/proc/{pid}/fd")) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{pid}/fd")) == before
