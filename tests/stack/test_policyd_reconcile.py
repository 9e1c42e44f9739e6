"""Start-up reconciliation against bad state, on the host stack without a service manager (the
degraded path: every device is re-opened by number through the broker with the diskseq XenStore
names). Test code, runs as root with real daemons.

Each case: the backend no longer names a device (libxl's: trio removed and hotplug-error says
why; a vbd policyd wrote: removed whole), the export is not listed, the audit says so, and no
loop device, node or fd is left. Also: new devices are refused before the fd store's size.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from harness import xenstore
from harness.stack import Stack, StackConfig
from restartlab import XVDK, block_script, cli, export, listing

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def listed(stack: Stack) -> list[str]:
    return list(listing(stack))


def restart_with(stack: Stack, tamper: Callable[[], None]) -> None:
    problems = stack.stop_policyd()
    assert problems == []
    tamper()
    stack.start_policyd()


@pytest.fixture
def plain_stack(stack_factory: Callable[[StackConfig], Stack]) -> Stack:
    return stack_factory(StackConfig(domains={"work": 1}))


@pytest.mark.parametrize(
    ("node", "value", "reason"),
    [
        ("diskseq", "fffffff", "DeviceChanged"),  # another device now: the broker refuses
        ("physical-device-path", "/etc/shadow", "is not a /dev node"),
        ("physical-device-path", "/dev/../etc/shadow", "is not a /dev node"),
        ("blockbroker-export", "x export 0", "malformed blockbroker-export"),
        ("physical-device", "zz:1", "no well-formed physical-device"),
        ("mode", "rw", "no valid mode"),
    ],
)
def test_an_export_whose_nodes_do_not_match_is_removed_at_start_up(
    plain_stack: Stack, node: str, value: str, reason: str
) -> None:
    stack = plain_stack
    image = stack.make_image("tampered.img", 1 << 20, b"tampered\n")
    exported = export(stack, image)
    be = exported["backend_path"]
    ref = os.open(exported["loop_device"], os.O_RDONLY)  # blkback's reference: still bound
    try:
        restart_with(stack, lambda: stack.xs_write(f"{be}/{node}", value))
        assert listed(stack) == []
        assert not stack.xs_exists(be)  # Export's vbd: removed whole
        assert not stack.xs_exists(f"/local/domain/1/device/vbd/{exported['devid']}")
        log = stack.log_tail("policyd", 100)
        assert "backend failed at start-up" in log and reason in log, log
        assert "event=audit result=failed operation=reconcile" in log
    finally:
        os.close(ref)
    deadline = time.monotonic() + 5
    while stack.leaked_loops() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.leaked_loops() == []  # policyd no longer holds it: AUTOCLEAR freed it


def test_a_libxl_backend_whose_device_is_gone_gets_hotplug_error(plain_stack: Stack) -> None:
    stack = plain_stack
    image = stack.make_image("attached.img", 1 << 20, b"attached\n")
    be = xenstore.write_libxl_vbd(stack.xs, 1, XVDK, str(image), "r")
    done = block_script(stack, "add", be)
    assert done.returncode == 0, done.stderr
    assert stack.xs_read(f"{be}/physical-device") is not None
    stack.restart_policyd()  # no store, no blkback reference: AUTOCLEAR freed the device
    assert listed(stack) == []
    assert stack.xs_read(f"{be}/physical-device") is None  # never names a freed device
    assert stack.xs_read(f"{be}/blockbroker-export") is None
    assert "could not be adopted" in (stack.xs_read(f"{be}/hotplug-error") or "")
    stack.xs_rm(be)
    stack.xs_rm(f"/local/domain/1/device/vbd/{XVDK}")
    assert stack.leaked_loops() == []


def test_new_devices_are_refused_before_the_fd_store_is_full(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    stack = stack_factory(StackConfig(domains={"work": 1}, policyd_args=["--fd-store-max", "2"]))
    images = [stack.make_image(f"img{i}.img", 1 << 20) for i in range(3)]
    held = [export(stack, image) for image in images[:2]]
    refused = cli(stack, "export", str(images[2]), "--to", "work")
    assert refused.returncode != 0
    assert "Busy" in refused.stderr and "FileDescriptorStoreMax=2" in refused.stderr
    assert not any(lp.backing_file == str(images[2]) for lp in stack.leaked_loops())
    assert len(listed(stack)) == 2
    for e in held:
        assert cli(stack, "detach", e["export"]).returncode == 0
    assert export(stack, images[2])["source"] == str(images[2])  # room again


def test_an_untagged_backend_left_by_an_older_version_is_adopted_and_tagged(
    plain_stack: Stack,
) -> None:
    """A version before tags wrote only the trio: libxl's backend (script=blockbroker-block)
    whose device is still the one named is adopted under a new number, and tagged."""
    stack = plain_stack
    image = stack.make_image("old.img", 1 << 20, b"old\n")
    be = xenstore.write_libxl_vbd(stack.xs, 1, XVDK, str(image), "r")
    assert block_script(stack, "add", be).returncode == 0
    loop = stack.xs_read(f"{be}/physical-device-path")
    assert loop is not None
    ref = os.open(loop, os.O_RDONLY)  # blkback's reference
    try:

        def as_an_older_version() -> None:
            stack.xs_rm(f"{be}/blockbroker-export")
            stack.xs_rm(f"{be}/blockbroker-source")

        restart_with(stack, as_an_older_version)
        (export,) = listed(stack)
        assert stack.xs_read(f"{be}/blockbroker-export").startswith(  # type: ignore[union-attr]
            export.rsplit("/", 1)[1] + " attach "
        )
        assert stack.xs_read(f"{be}/physical-device-path") == loop
    finally:
        os.close(ref)
    assert block_script(stack, "remove", be).returncode == 0
    stack.xs_rm(be)
    stack.xs_rm(f"/local/domain/1/device/vbd/{XVDK}")
    assert listed(stack) == []


def test_start_up_waits_for_an_unavailable_broker_instead_of_failing_backends(
    plain_stack: Stack,
) -> None:
    """The broker is down while policyd starts: reconciliation waits for it (a backend is
    never failed for that, its nodes name a good device) and adopts once it is back."""
    stack = plain_stack
    image = stack.make_image("waits.img", 1 << 20, b"waits\n")
    exported = export(stack, image)
    ref = os.open(exported["loop_device"], os.O_RDONLY)  # blkback's reference
    done = threading.Event()

    def broker_back_later() -> None:
        # a daemon dies with the thread that started it (PR_SET_PDEATHSIG): this one waits
        time.sleep(2.0)
        stack._start_broker()
        done.wait(60)

    late = threading.Thread(target=broker_back_later)
    try:
        assert stack.stop_policyd() == []
        assert stack.daemons.pop("broker").stop(5.0) == []
        late.start()
        stack.start_policyd()  # ready only once reconciled: after the broker is back
        assert listed(stack) == [exported["export"]]
        assert "the broker is unavailable at start-up; waiting" in stack.log_tail("policyd", 200)
        assert cli(stack, "detach", exported["export"]).returncode == 0
    finally:
        os.close(ref)
        assert stack.stop_policyd() == []
        stack.daemons.pop("broker").stop(5.0)
        done.set()
        late.join()
