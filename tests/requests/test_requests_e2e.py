"""End to end on the host stack: a VM (sys-usb, domid 5) asks through the VM-side helper and
the qrexec bridge to export its own loop device to another VM; a person approves through polkit
(a non-root uid), and the vbd nodes appear pinned to the device's diskseq - or, when the device
was re-bound in the meantime, the approval is refused and nothing is written.

Runs as root with real daemons (oxenstored, dbus-daemon, polkitd, broker, policyd as user
blockbroker); the bridge runs as uid 65534 with group blockbroker-qrexec.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness.names import REQUEST_IFACE
from harness.stack import Stack
from reqlab import (
    NOBODY,
    XVDB,
    audit_lines,
    call,
    detach_export,
    finish,
    frontends,
    helper_argv,
    managed_exports,
    managed_requests,
    publish,
    remove_vbd,
    start_helper,
    sysfs,
    vm_backends,
    vm_loop,
    wait_request,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def test_approval_writes_the_vbd_pinned_to_the_diskseq(stack: Stack, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        major, minor = map(int, sysfs(dev, "dev").split(":"))
        diskseq = int(sysfs(dev, "diskseq"))
        helper = start_helper(stack, helper_argv(dev, "work"))
        path, props = wait_request(stack, dev.name)
        assert (props["Source"], props["Target"], props["Diskseq"]) == ("sys-usb", "work", diskseq)
        assert (props["Major"], props["Minor"], props["Mode"]) == (major, minor, "r")
        assert props["Description"] == "vm-disk.img"
        assert props["Rule"].endswith("50-test.policy:4")
        assert vm_backends(stack, 5) == []  # nothing before a person decides

        assert call(stack, "Approve", path=path, iface=REQUEST_IFACE, user=NOBODY)["error"] is None
        status, answer, err = finish(helper)
        be = f"/local/domain/5/backend/vbd/1/{XVDB}"
        assert (status, answer) == (0, f"ok devid={XVDB} backend={be}"), err
        try:
            fe = f"/local/domain/1/device/vbd/{XVDB}"
            assert stack.xs_read(f"{be}/params") == f"/dev/{dev.name}"
            assert stack.xs_read(f"{be}/physical-device") == f"{major:x}:{minor:x}"
            assert stack.xs_read(f"{be}/diskseq") == f"{diskseq:x}"
            assert stack.xs_read(f"{be}/mode") == "r"
            assert stack.xs_read(f"{be}/frontend") == fe
            assert stack.xs_read(f"{fe}/backend") == be
            assert stack.xs_read(f"{fe}/backend-id") == "5"
            # the backend dir belongs to the source VM (its blkback), readable by the target
            assert stack.xs_perms(be) == ["n5", "r1"]
            assert stack.xs_perms("/local/domain/5/backend/vbd/1") == ["n5", "r1"]
            assert stack.xs_perms(fe) == ["n1", "r5"]
            assert path not in managed_requests(stack)  # decided: the object is gone
            approved = [line for line in audit_lines(stack) if path in line]
            assert any("result=approved" in line and "uid=65534" in line for line in approved)
            assert any(f"diskseq={diskseq}" in line for line in approved)
            # the approved export is an Export object like dom0's: listed, detachable
            ((export, props),) = managed_exports(stack).items()
            assert (props["BackendDomain"], props["BackendDomid"]) == ("sys-usb", 5)
            assert (props["FrontendDomain"], props["Devid"], props["Diskseq"]) == (
                "work", XVDB, diskseq)  # fmt: skip
            assert props["BackendPath"] == be and props["SourceKind"] == "vm"
            assert props["State"] == "backend-in-vm"  # its blkback is the VM's, not dom0's
            detach_export(stack, export)
            assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []
            assert managed_exports(stack) == {}
        finally:
            if stack.xs_exists(be):
                remove_vbd(stack, be)


def test_rebound_device_is_refused_with_device_changed(stack: Stack, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        path, props = wait_request(stack, dev.name)
        backing = loop_dir / "vm-disk.img"
        # The VM detaches and re-binds its loop device: same name, a new diskseq. Its udev hook
        # publishes the new identity, as the helper did for the old one.
        subprocess.run(["losetup", "--detach", str(dev)], check=True)
        rebound = subprocess.run(["losetup", str(dev), str(backing)], check=False)
        if rebound.returncode == 0:
            assert int(sysfs(dev, "diskseq")) != props["Diskseq"]
            publish(stack, 5, dev.name, sysfs(dev, "dev"), sysfs(dev, "diskseq"))
        else:  # another process took the number: the device the VM named is gone
            stack.xs_rm(f"/local/domain/5/data/blockbroker/{dev.name}")
        refused = call(stack, "Approve", path=path, iface=REQUEST_IFACE, user=NOBODY)
        assert refused["error"] == "DeviceChanged", refused
        assert "nothing was written" in refused["message"]
        status, answer, _ = finish(helper)
        assert status == 1 and answer.startswith("error DeviceChanged"), answer
        assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []
        assert path not in managed_requests(stack)
        assert any("result=failed" in line and "error=DeviceChanged" in line
                   for line in audit_lines(stack) if path in line)  # fmt: skip


def test_policy_allow_exports_at_once_through_the_bridge(stack: Stack, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "untrusted"))
        status, answer, err = finish(helper)
        be = f"/local/domain/5/backend/vbd/2/{XVDB}"
        assert (status, answer) == (0, f"ok devid={XVDB} backend={be}"), err
        try:
            assert stack.xs_read(f"{be}/diskseq") == f"{int(sysfs(dev, 'diskseq')):x}"
            assert any("decided_by=\"rule " in line and "50-test.policy:3" in line
                       for line in audit_lines(stack))  # fmt: skip
            (export,) = managed_exports(stack)
            detach_export(stack, export)
            assert vm_backends(stack, 5) == [] and frontends(stack, 2) == []
        finally:
            if stack.xs_exists(be):
                remove_vbd(stack, be)


def test_person_denies(stack: Stack, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        path, _ = wait_request(stack, dev.name)
        assert call(stack, "Deny", path=path, iface=REQUEST_IFACE, user=NOBODY)["error"] is None
        status, answer, _ = finish(helper)
        assert (status, answer) == (4, "denied by a person")
        assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []
        again = call(stack, "Approve", path=path, iface=REQUEST_IFACE, user=NOBODY)
        assert again["error"] == "NotFound" and "denied" in again["message"]


def test_bridge_answers_when_policyd_goes_away(stack: Stack, loop_dir: Path) -> None:
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "work"))
        wait_request(stack, dev.name)
        stack.restart_policyd()  # pending requests do not survive a restart
        status, answer, _ = finish(helper)
        assert status == 1 and answer.startswith("error Unavailable "), answer
        assert vm_backends(stack, 5) == [] and managed_requests(stack) == {}


def test_a_vm_device_export_survives_a_restart_and_forged_tags_are_ignored(
    stack: Stack, loop_dir: Path
) -> None:
    """policyd keeps what it wrote for a VM's device in a record of its own (the VM owns its
    backend dir); after a restart the export is listed again with its number. A tag the VM
    forges in its own backend dir, naming another domain's frontend, is not taken: nothing is
    listed for it and nothing outside the VM's dir is touched."""
    with vm_loop(loop_dir) as dev:
        helper = start_helper(stack, helper_argv(dev, "untrusted"))
        status, answer, err = finish(helper)
        be = f"/local/domain/5/backend/vbd/2/{XVDB}"
        assert (status, answer) == (0, f"ok devid={XVDB} backend={be}"), err
        forged = "/local/domain/5/backend/vbd/1/51760"  # sys-usb's own dir, frontend: work
        victim = "/local/domain/1/device/vbd/51760"
        try:
            (export,) = managed_exports(stack)
            stack.xs_write(victim, "")  # another backend's frontend node in domain work
            for kind in ("export", "vm"):
                stack.xs_write(f"{forged}/blockbroker-export", f"1 {kind} 0")
                stack.xs_write(f"{forged}/physical-device", "7:0")
                stack.xs_write(f"{forged}/diskseq", "1")
                stack.xs_write(f"{forged}/mode", "w")
                stack.restart_policyd()
                assert list(managed_exports(stack)) == [export]  # only the real one
                assert stack.xs_exists(victim) and stack.xs_exists(forged)
            detach_export(stack, export)
            assert not stack.xs_exists(be)
            assert frontends(stack, 2) == []
        finally:
            for path in (be, forged, victim):
                if stack.xs_exists(path):
                    stack.xs_rm(path)
