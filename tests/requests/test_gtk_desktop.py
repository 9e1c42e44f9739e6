"""`blockbroker-gtk` used as a person would: under Xvfb, driven through its accessibility tree.

Runs as root with the host stack (real oxenstored, dbus-daemon, polkitd, broker, policyd); the
window runs as user nobody (the polkit rules of conftest.py let nobody approve, deny and detach)
on its own session bus with AT-SPI; harness/a11y.py finds rows and presses buttons the way a
screen reader does. A VM's request (the VM-side helper through the qrexec bridge, as in
test_requests_e2e.py) must appear without any refresh, Approve must turn it into an export, Deny
must remove it, a re-bound device must show DeviceChanged, Detach must remove the export.
With BLOCKBROKER_SCREENSHOTS=<dir> (`make screenshots`) the window is saved there as PNGs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.desktop import Desktop
from harness.stack import Stack
from reqlab import (
    finish,
    frontends,
    helper_argv,
    managed_exports,
    managed_requests,
    publish,
    start_helper,
    sysfs,
    vm_backends,
    vm_loop,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]
SHOTS = os.environ.get("BLOCKBROKER_SCREENSHOTS")


@pytest.fixture
def window(stack: Stack) -> Iterator[Desktop]:
    desktop = Desktop()
    try:
        desktop.start()
        desktop.run_app(
            "blockbroker-gtk",
            [str(stack.config.venv / "bin/blockbroker-gtk")],
            DBUS_SYSTEM_BUS_ADDRESS=stack.bus_address,
        )
        desktop.ask(op="wait", role="frame", name="^Block exports$")
        desktop.ask(op="wait", role="label", name="policyd is running")
        yield desktop
    finally:
        problems = desktop.stop()
    assert not problems, problems


def request_row(dev: Path) -> str:
    return f"^sys-usb asks to give its device '{dev.name}' to work · claimed: 'vm-disk.img'"


def shot(desktop: Desktop, name: str) -> None:
    if SHOTS:
        desktop.screenshot(Path(SHOTS) / name)


def test_approve_then_detach(stack: Stack, window: Desktop, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        row = request_row(dev)
        diskseq = int(sysfs(dev, "diskseq"))
        (name,) = window.ask(op="wait", role="list item", name=row)["names"]
        assert f"diskseq {diskseq:#x}" in name and "1.0 MiB" in name and "read-only" in name
        assert "left" in name  # time left, from the request's expiry
        shot(window, "gtk-request.png")

        window.ask(op="press", row=row, button="Approve")
        status, answer, err = finish(helper)
        assert status == 0 and answer.startswith("ok devid="), (answer, err)
        window.ask(op="wait", role="list item", name=row, present=False)
        window.ask(op="wait", role="label", name="^Approved request ")
        (export_path,) = managed_exports(stack)
        number = export_path.rsplit("/", 1)[-1]
        export = (
            f"^sys-usb:/dev/{dev.name} → work · from sys-usb · read-only · "
            f"diskseq {diskseq:#x} · .* · export {number}\\b"
        )
        window.ask(op="wait", role="list item", name=export)
        shot(window, "gtk-exports.png")

        window.ask(op="press", row=export, button="Detach")
        window.ask(op="wait", role="list item", name=export, present=False)
        window.ask(op="wait", role="label", name="^Detached export ")
        assert managed_exports(stack) == {}
        assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []


def test_deny(stack: Stack, window: Desktop, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        row = request_row(dev)
        window.ask(op="wait", role="list item", name=row)
        window.ask(op="press", row=row, button="Deny")
        window.ask(op="wait", role="list item", name=row, present=False)
        window.ask(op="wait", role="label", name="^Denied request ")
        assert finish(helper)[:2] == (4, "denied by a person")
        assert vm_backends(stack, 5) == [] and managed_requests(stack) == {}


def test_device_changed_is_shown(stack: Stack, window: Desktop, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        row = request_row(dev)
        window.ask(op="wait", role="list item", name=row)
        # The VM re-binds its loop device underneath the request (test_requests_e2e.py).
        subprocess.run(["losetup", "--detach", str(dev)], check=True)
        if subprocess.run(["losetup", str(dev), str(loop_dir / "vm-disk.img")]).returncode == 0:
            publish(stack, 5, dev.name, sysfs(dev, "dev"), sysfs(dev, "diskseq"))
        else:
            stack.xs_rm(f"/local/domain/5/data/blockbroker/{dev.name}")
        window.ask(op="press", row=row, button="Approve")
        window.ask(op="wait", role="label", name="^Approving failed: DeviceChanged: ")
        window.ask(op="wait", role="list item", name=row, present=False)
        status, answer, _ = finish(helper)
        assert status == 1 and answer.startswith("error DeviceChanged"), answer
        assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []
