"""Export, list and detach over D-Bus, checked against XenStore, sysfs and policyd's fds.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import time

import pytest
from harness.loops import loops_of, loops_released, sysfs
from harness.names import EXPORT_IFACE, MANAGER, MANAGER_IFACE, OM_IFACE
from harness.stack import Stack
from harness.xenstore import register_domain
from policydlab import (
    XVDB,
    XVDC,
    Api,
    assert_clean,
    held_block_fds,
    ro,
    u32,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def test_export_writes_vbd_nodes_and_holds_a_loop(stack: Stack, api: Api) -> None:
    image = stack.make_image("export-basic.img", content=b"DISK-A")
    export = api.export(image)
    props = api.props(export)
    loop = props["LoopDevice"].removeprefix("/dev/")
    assert loops_of(image) == [loop]
    assert sysfs(loop, "loop/backing_file") == str(image)
    assert sysfs(loop, "loop/autoclear") == "1"
    assert sysfs(loop, "ro") == "1"
    assert int(sysfs(loop, "diskseq")) == props["Diskseq"]
    assert sysfs(loop, "dev") == f"{props['Major']}:{props['Minor']}"
    assert props["Source"] == str(image)
    assert props["SourceKind"] == "file"
    assert props["FrontendDomain"] == "work" and props["FrontendDomid"] == 1
    assert props["BackendDomain"] == "Domain-0" and props["BackendDomid"] == 0
    assert props["Devid"] == XVDB
    assert props["Mode"] == "r"
    assert props["State"] == "no-blkback"  # this host has no xen-backend bus
    assert props["Since"] > 0

    be = f"/local/domain/0/backend/vbd/1/{XVDB}"
    fe = f"/local/domain/1/device/vbd/{XVDB}"
    assert props["BackendPath"] == be
    expected_be = {
        "frontend": fe,
        "frontend-id": "1",
        "params": str(image),
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": "1",
        "dev": "xvdb",
        "type": "phy",
        "mode": "r",
        "device-type": "disk",
        "discard-enable": "0",
        "physical-device": f"{props['Major']:x}:{props['Minor']:x}",
        "physical-device-path": props["LoopDevice"],
        "diskseq": f"{props['Diskseq']:x}",
        # the tag reconciliation finds again after a restart: number, kind, Since; Source
        "blockbroker-export": f"{export.rsplit('/', 1)[1]} export {props['Since']}",
        "blockbroker-source": str(image),
    }
    assert {n: stack.xs_read(f"{be}/{n}") for n in stack.xs_ls(be)} == expected_be
    expected_fe = {
        "backend": be,
        "backend-id": "0",
        "state": "1",
        "virtual-device": str(XVDB),
        "device-type": "disk",
    }
    assert {n: stack.xs_read(f"{fe}/{n}") for n in stack.xs_ls(fe)} == expected_fe
    # blkfront must be able to write its nodes, blkback to read them (lab recipe)
    assert stack.xs_perms("/local/domain/0/backend/vbd/1") == ["n0", "r1"]
    assert stack.xs_perms(be) == ["n0", "r1"]
    assert stack.xs_perms("/local/domain/1/device/vbd") == ["n1", "r0"]
    assert stack.xs_perms(fe) == ["n1", "r0"]
    assert held_block_fds(stack) == [(props["Major"], props["Minor"])]

    assert api.managed() == {export: props}
    assert api.props(MANAGER, MANAGER_IFACE)["ExportCount"] == 1

    api.detach(export)
    assert api.managed() == {}
    assert api.props(MANAGER, MANAGER_IFACE)["ExportCount"] == 0
    assert_clean(stack, image)
    # the frontend's dir under dom0's backend/vbd goes with its last device (policyd made it)
    assert not stack.xs_exists("/local/domain/0/backend/vbd/1")
    stack.xs_rm("/local/domain/1/device/vbd")


def test_object_manager_signals_come_from_the_manager_path(stack: Stack, api: Api) -> None:
    image = stack.make_image("export-signals.img")
    export = api.export(image)
    api.ok("DetachExport", "o", [export])
    api.pump()
    om = [(s.member, s.path, s.body[0]) for s in api.signals if s.interface == OM_IFACE]
    assert om == [("InterfacesAdded", MANAGER, export), ("InterfacesRemoved", MANAGER, export)]
    added = next(s for s in api.signals if s.member == "InterfacesAdded")
    assert added.body[1][EXPORT_IFACE]["Source"].value == str(image)
    counts = [
        s.body[1]["ExportCount"].value
        for s in api.signals
        if s.member == "PropertiesChanged" and "ExportCount" in s.body[1]
    ]
    assert counts == [1, 0]
    assert_clean(stack, image)


def test_devids_are_allocated_from_xvdb_and_can_be_chosen(stack: Stack, api: Api) -> None:
    a = stack.make_image("devid-a.img")
    b = stack.make_image("devid-b.img")
    c = stack.make_image("devid-c.img")
    first = api.export(a)
    second = api.export(b, "untrusted")
    chosen = api.export(c, **{"devid": u32(XVDC + 16)})
    assert api.props(first)["Devid"] == XVDB
    assert api.props(second)["Devid"] == XVDB  # another domain: its own numbering
    assert api.props(chosen)["Devid"] == XVDC + 16
    assert api.props(chosen)["BackendPath"].endswith(f"/1/{XVDC + 16}")
    assert api.export_err(a, "work", devid=u32(XVDC + 16)) == "Busy"
    third = api.export(stack.make_image("devid-d.img"))
    assert api.props(third)["Devid"] == XVDC  # the first free one
    for export in (first, second, chosen, third):
        api.detach(export)
    assert_clean(stack, a, b, c)


def test_read_write_export(stack: Stack, api: Api) -> None:
    image = stack.make_image("export-rw.img")
    export = api.export(image, **{"read-only": ro(False)})
    props = api.props(export)
    loop = props["LoopDevice"].removeprefix("/dev/")
    assert props["Mode"] == "w"
    assert sysfs(loop, "ro") == "0"
    assert stack.xs_read(f"{props['BackendPath']}/mode") == "w"
    api.detach(export)
    assert_clean(stack, image)


def test_export_fd_of_a_block_device(stack: Stack, api: Api) -> None:
    image = stack.make_image("export-fd.img")
    holder = api.export(image)  # a loop device to pass by fd (block majors allow 7 here)
    loop_path = api.props(holder)["LoopDevice"]
    keeper = os.open(loop_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        api.detach(holder)  # now the device is held by nobody but us
        fd = os.open(loop_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            export = str(api.ok("ExportFd", "hsa{sv}", [0, "untrusted", {}], fds=[fd]))
        finally:
            os.close(fd)
        props = api.props(export)
        assert props["SourceKind"] == "block"
        assert props["LoopDevice"] == ""
        assert props["Source"] == f"fd:{props['Major']}:{props['Minor']}"
        assert props["Major"] == 7 and f"/dev/loop{props['Minor']}" == loop_path
        assert stack.xs_read(f"{props['BackendPath']}/physical-device") == (
            f"{props['Major']:x}:{props['Minor']:x}"
        )
        assert held_block_fds(stack) == [(7, props["Minor"])]  # the fd the caller passed
        api.detach(export)
    finally:
        os.close(keeper)
    assert_clean(stack, image)


def test_export_fd_of_a_held_loop_device_shares_it(stack: Stack, api: Api) -> None:
    image = stack.make_image("export-fd-shared.img")
    holder = api.export(image)
    fd = os.open(api.props(holder)["LoopDevice"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        export = str(api.ok("ExportFd", "hsa{sv}", [0, "untrusted", {}], fds=[fd]))
        body = [0, "untrusted", {"read-only": ro(False)}]
        assert api.err("ExportFd", "hsa{sv}", body, fds=[fd]) in ("Busy", "InvalidArgument")
    finally:
        os.close(fd)
    assert api.props(export)["SourceKind"] == "file"  # it is the loop device of that file
    assert len(held_block_fds(stack)) == 1
    api.detach(holder)
    api.detach(export)
    assert_clean(stack, image)


def test_detach_twice_and_unknown_objects(stack: Stack, api: Api) -> None:
    image = stack.make_image("detach-twice.img")
    export = api.export(image)
    api.detach(export)
    assert api.err("Detach", path=export, iface=EXPORT_IFACE) == "NotFound"
    assert api.err("DetachExport", "o", [export]) == "NotFound"
    assert api.err("DetachExport", "o", ["/org/qubes/BlockBroker1/export/999999"]) == "NotFound"
    assert api.err("DetachExport", "o", ["/org/qubes/BlockBroker1"]) == "NotFound"
    assert_clean(stack, image)


def test_exports_of_a_destroyed_frontend_are_detached(stack: Stack, api: Api) -> None:
    """libxl removes /local/domain/<domid> when it destroys a domain but knows nothing of the
    vbds Export wrote: policyd sees the frontend's name node go (a XenStore watch) and detaches
    them (nodes removed, loop device freed). Another domain's export stays."""
    doomed_image = stack.make_image("destroyed-fe.img")
    other_image = stack.make_image("other-fe.img")
    doomed = api.export(doomed_image, "work")
    other = api.export(other_image, "untrusted")
    doomed_be = str(api.props(doomed)["BackendPath"])
    assert stack.xs_exists(doomed_be)

    stack.xs_rm(f"/local/domain/{stack.domains['work']}")  # what libxl's destroy does
    try:
        wait_detached(api, doomed)
    finally:
        register_domain(stack.xs, "work", stack.domains["work"])  # the stack is shared
    assert doomed not in api.managed() and other in api.managed()
    assert not stack.xs_exists(doomed_be)
    assert loops_released(doomed_image)
    assert len(held_block_fds(stack)) == 1
    assert any(
        "frontend domain gone" in line for line in stack.log_tail("policyd", 50).splitlines()
    )
    api.detach(other)
    assert loops_released(other_image)


def wait_detached(api: Api, export: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while export in api.managed() and time.monotonic() < deadline:
        time.sleep(0.02)
