"""Exports survive policyd's restarts: real systemd 252 (user manager) with its fd store, the
real broker (socket-activated), oxenstored and dbus-daemon; and the degraded path without a
store. Test code, runs as root.

After every restart: each export is listed with the same identity (number, source, device,
diskseq, mode, backend, Since), the loop devices stayed bound to their files, dedup and
read-write exclusion hold, detach works through the CLI and libxl's remove, nothing leaks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import xenstore
from harness.stack import Stack, StackConfig
from restartlab import VENV, XVDK, block_script, cli, export, listing

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def bound_to(loop: str) -> str | None:
    try:
        return Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def diskseq(loop: str) -> int:
    return int(Path(f"/sys/block/{Path(loop).name}/diskseq").read_text())


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def four_exports(stack: Stack) -> tuple[dict[str, dict[str, Any]], Path, Path]:
    """The issue's scenario: one image read-only to two domains (one loop device, blkback has
    opened it), one read-write, one through libxl's Attach path (blkback not yet)."""
    shared = stack.make_image("shared.img", 1 << 20, b"shared\n")
    private = stack.make_image("private.img", 1 << 20, b"private\n")
    attached = stack.make_image("attached.img", 1 << 20, b"attached\n")
    first = export(stack, shared, "work", "--ro")
    second = export(stack, shared, "other", "--ro")
    assert first["loop_device"] == second["loop_device"]
    stack.blkback_open(1, int(first["devid"]), int(first["major"]), int(first["minor"]))
    export(stack, private, "work", "--rw")
    be = xenstore.write_libxl_vbd(stack.xs, 1, XVDK, str(attached), "r")
    done = block_script(stack, "add", be)
    assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
    before = listing(stack)
    assert len(before) == 4
    return before, shared, private


def assert_same_exports(stack: Stack, before: dict[str, dict[str, Any]]) -> None:
    after = listing(stack)
    assert after.keys() == before.keys()
    for path, old in before.items():
        new = after[path]
        for field in ("source", "loop_device", "major", "minor", "diskseq", "mode",
                      "backend_path", "frontend_domain", "since"):  # fmt: skip
            if field in old:
                assert new[field] == old[field], (path, field)
        if old.get("loop_device"):
            assert bound_to(old["loop_device"]) is not None
            assert diskseq(old["loop_device"]) == old["diskseq"]


def assert_dedup_and_exclusion(stack: Stack, shared: Path, before: dict[str, Any]) -> None:
    loop = next(e["loop_device"] for e in before.values() if e["source"] == str(shared))
    third = export(stack, shared, "work", "--ro")
    assert third["loop_device"] == loop  # one loop device per read-only file, still
    refused = cli(stack, "export", str(shared), "--to", "other", "--rw")
    assert refused.returncode != 0 and "Busy" in refused.stderr  # never rw while shared
    assert cli(stack, "detach", third["export"]).returncode == 0


def detach_all(stack: Stack, before: dict[str, dict[str, Any]]) -> None:
    for path, e in before.items():
        if e["backend_path"].endswith(f"/{XVDK}"):
            done = block_script(stack, "remove", e["backend_path"])  # libxl's remove
            assert done.returncode == 0, done.stderr
            stack.xs_rm(e["backend_path"])
        else:
            done = cli(stack, "detach", path)
            assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
    assert listing(stack) == {}
    stack.blkback_close(1, int(next(iter(before.values()))["devid"]))


def new_main_pid(stack: Stack, old: int) -> None:
    assert stack.manager is not None
    manager = stack.manager
    wait_until(
        lambda: (
            manager.main_pid(Stack.POLICYD_UNIT) not in (0, old)
            and manager.is_active(Stack.POLICYD_UNIT)
        ),
        "policyd back under a new main pid",
    )


@pytest.fixture
def systemd_stack(stack_factory: Callable[[StackConfig], Stack]) -> Stack:
    return stack_factory(
        StackConfig(domains={"work": 1, "other": 2}, systemd=True, sysfs_blkback=True)
    )


def test_exports_survive_sigkill_and_systemctl_restart_through_the_fd_store(
    systemd_stack: Stack,
) -> None:
    stack = systemd_stack
    assert stack.manager is not None
    before, shared, _ = four_exports(stack)

    old = stack.manager.main_pid(Stack.POLICYD_UNIT)
    stack.manager.kill(Stack.POLICYD_UNIT, signal.SIGKILL)
    new_main_pid(stack, old)
    assert_same_exports(stack, before)
    assert_dedup_and_exclusion(stack, shared, before)

    old = stack.manager.main_pid(Stack.POLICYD_UNIT)
    stack.restart_policyd()  # one restart job: the store is kept
    new_main_pid(stack, old)
    assert_same_exports(stack, before)
    assert "reconciled" in stack.log_tail("policyd", 200)

    # numbers are never given to another export after a restart
    fresh = export(stack, stack.make_image("fresh.img"), "work", "--ro")
    assert int(fresh["export"].rsplit("/", 1)[1]) > max(int(p.rsplit("/", 1)[1]) for p in before)
    assert cli(stack, "detach", fresh["export"]).returncode == 0
    detach_all(stack, before)
    assert stack.leaked_loops() == []


def flushed_store_case(stack: Stack, lose_the_store: Callable[[], None]) -> None:
    """After the store was flushed: the device blkback holds is adopted again; the loop devices
    no one held were freed, and what named them is gone (libxl's backend: told why)."""
    before, _, _ = four_exports(stack)
    held_by_blkback = next(
        e
        for e in before.values()
        if e["frontend_domain"] == "work" and e["source"].endswith("/shared.img")
    )
    # blkback's own reference, played by an open fd of the loop device
    ref = os.open(held_by_blkback["loop_device"], os.O_RDONLY)
    try:
        lose_the_store()
        wait_until(lambda: stack.has_owner("org.qubes.BlockBroker1"), "policyd on the bus")
        after = listing(stack)
        survivors = {
            p for p, e in after.items() if e["loop_device"] == held_by_blkback["loop_device"]
        }
        assert survivors == {
            p for p, e in before.items() if e["loop_device"] == held_by_blkback["loop_device"]
        }
        for path, e in before.items():
            if path in survivors:
                continue
            be = e["backend_path"]
            if be.endswith(f"/{XVDK}"):  # libxl's: told why, the device no longer named
                assert stack.xs_read(f"{be}/physical-device") is None
                assert "could not be adopted" in (stack.xs_read(f"{be}/hotplug-error") or "")
                stack.xs_rm(be)  # libxl's remove
            else:  # Export's vbd: removed whole (policyd wrote it; nobody else would)
                assert not stack.xs_exists(be)
    finally:
        os.close(ref)
    for path in survivors:
        assert cli(stack, "detach", path).returncode == 0
    stack.blkback_close(1, int(held_by_blkback["devid"]))
    assert listing(stack) == {}
    wait_until(lambda: stack.leaked_loops() == [], "loop devices released")


def test_stop_and_start_fails_the_backends_whose_devices_are_gone(systemd_stack: Stack) -> None:
    """systemd 252 flushes the store on stop."""
    manager = systemd_stack.manager
    assert manager is not None

    def stop_start() -> None:
        manager.systemctl("stop", Stack.POLICYD_UNIT)
        manager.start(Stack.POLICYD_UNIT)

    flushed_store_case(systemd_stack, stop_start)


def test_the_start_limit_flushes_the_store_and_the_next_start_is_safe(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    """Killed more often than StartLimitBurst allows, the unit fails and systemd flushes the
    store; an administrator's `reset-failed` + `start` then takes the degraded path."""
    stack = stack_factory(
        StackConfig(
            domains={"work": 1, "other": 2}, systemd=True, sysfs_blkback=True, start_limit_burst=2
        )
    )
    manager = stack.manager
    assert manager is not None

    def hit_the_start_limit() -> None:
        for _ in range(3):
            pid = manager.main_pid(Stack.POLICYD_UNIT)
            if pid:
                manager.kill(Stack.POLICYD_UNIT, signal.SIGKILL)
                wait_until(lambda p=pid: manager.main_pid(Stack.POLICYD_UNIT) != p, "death")
            wait_until(
                lambda: (
                    manager.is_active(Stack.POLICYD_UNIT)
                    or manager.show(Stack.POLICYD_UNIT, "ActiveState") == "failed"
                ),
                "policyd back, or failed at its start limit",
            )
        # systemd 252 refuses the restart: failed (Result=signal), no job: the store is flushed
        assert manager.show(Stack.POLICYD_UNIT, "ActiveState") == "failed"
        manager.systemctl("reset-failed", Stack.POLICYD_UNIT)
        manager.start(Stack.POLICYD_UNIT)

    flushed_store_case(stack, hit_the_start_limit)


def test_without_a_store_a_device_still_bound_is_adopted_again(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    """The degraded path (no service manager): the device is re-opened by number through the
    broker with the diskseq XenStore names, and held again."""
    stack = stack_factory(StackConfig(domains={"work": 1}))
    image = stack.make_image("degraded.img", 1 << 20, b"degraded\n")
    exported = export(stack, image, "work", "--ro")
    ref = os.open(exported["loop_device"], os.O_RDONLY)  # blkback's reference
    try:
        stack.restart_policyd()
    finally:
        os.close(ref)
    (again,) = listing(stack).values()
    assert again["export"] == exported["export"]
    assert (again["loop_device"], again["diskseq"]) == (
        exported["loop_device"],
        exported["diskseq"],
    )
    assert bound_to(exported["loop_device"]) == str(image)  # held again: AUTOCLEAR waits
    assert cli(stack, "detach", exported["export"]).returncode == 0
    wait_until(lambda: stack.leaked_loops() == [], "loop device released")


def test_a_pre_attach_killed_before_its_claim_is_adopted_and_claimed(
    systemd_stack: Stack,
) -> None:
    """policyd pre-attached a backend (trio written, its fd in the store) and is killed before
    the script's Attach: the restart adopts the export from the store, the script's `add` gets
    that same export (no second loop device), and libxl's removal detaches it."""
    stack = systemd_stack
    assert stack.manager is not None
    image = stack.make_image("pre-kill.img", 1 << 20, b"pre-kill\n")
    be = xenstore.write_libxl_vbd(
        stack.xs, 1, XVDK, str(image), "r", {"script": "/etc/xen/scripts/blockbroker-block"}
    )
    wait_until(lambda: stack.xs_read(f"{be}/physical-device") is not None, "the pre-attach")
    [before] = [e for e in listing(stack).values() if e["backend_path"] == be]

    old = stack.manager.main_pid(Stack.POLICYD_UNIT)
    stack.manager.kill(Stack.POLICYD_UNIT, signal.SIGKILL)
    new_main_pid(stack, old)
    wait_until(lambda: stack.has_owner("org.qubes.BlockBroker1"), "policyd on the bus")
    assert_same_exports(stack, {before["export"]: before})

    done = block_script(stack, "add", be)
    assert done.returncode == 0, done.stderr
    assert_same_exports(stack, {before["export"]: before})  # that export, no second one
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    assert bound_to(before["loop_device"]) == str(image)

    xenstore.begin_libxl_remove(stack.xs, be)
    wait_until(lambda: stack.xs_read(f"{be}/physical-device") is None, "the pre-detach")
    assert block_script(stack, "remove", be).returncode == 0
    stack.xs_rm(be)
    assert listing(stack) == {}
    wait_until(lambda: stack.leaked_loops() == [], "loop device released")


def test_exports_survive_a_dbus_daemon_restart(systemd_stack: Stack) -> None:
    """policyd exits when it loses the bus; systemd brings it back through the store."""
    stack = systemd_stack
    assert stack.manager is not None
    before, shared, _ = four_exports(stack)
    old = stack.manager.main_pid(Stack.POLICYD_UNIT)
    stack.restart_bus()
    new_main_pid(stack, old)
    wait_until(lambda: stack.has_owner("org.qubes.BlockBroker1"), "policyd on the new bus")
    assert_same_exports(stack, before)
    assert_dedup_and_exclusion(stack, shared, before)
    detach_all(stack, before)
    assert stack.leaked_loops() == []


def test_a_broker_killed_mid_request_costs_only_that_request(systemd_stack: Stack) -> None:
    """The broker is stopped while an Export's request waits in its socket, then SIGKILLed:
    policyd's connection ends, it connects again (socket activation starts a new broker) and
    the Export succeeds within its deadline; the other exports are untouched."""
    stack = systemd_stack
    assert stack.manager is not None
    before, _, _ = four_exports(stack)
    broker = "blockbroker-broker.service"
    pid = stack.manager.main_pid(broker)
    os.kill(pid, signal.SIGSTOP)
    image = stack.make_image("during.img", 1 << 20, b"during\n")
    proc = subprocess.Popen(
        [str(VENV / "bin/blockbroker"), "export", str(image), "--to", "work", "--json"],
        env=stack.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # the request is in the stopped broker's socket
    stack.manager.kill(broker, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err + stack.log_tail("policyd")
    during = json.loads(out)
    assert bound_to(during["loop_device"]) == str(image)
    assert stack.manager.main_pid(broker) not in (0, pid)
    assert cli(stack, "detach", during["export"]).returncode == 0
    assert_same_exports(stack, before)
    detach_all(stack, before)
    wait_until(lambda: stack.leaked_loops() == [], "no loop device left")
