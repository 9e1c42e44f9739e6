"""Attach/Detach: the libxl block-script path, with nodes written as libxl's device_disk_add
writes them. Also junk in those nodes and malformed backend paths.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from harness.loops import loops_of, loops_released
from harness.stack import Stack
from policydlab import (
    XVDA,
    Api,
    assert_clean,
    held_block_fds,
    remove_libxl_vbd,
    write_libxl_vbd,
    xs_write_raw,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def trio(stack: Stack, be: str) -> dict[str, str | None]:
    names = ("physical-device", "physical-device-path", "diskseq")
    return {n: stack.xs_read(f"{be}/{n}") for n in names}


def test_attach_writes_the_physical_device_trio(stack: Stack, api: Api) -> None:
    image = stack.make_image("attach.img", content=b"ATTACH")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), mode="w")
    export = str(api.ok("Attach", "s", [be]))
    props = api.props(export)
    assert props["BackendPath"] == be
    assert props["Mode"] == "w" and props["Devid"] == XVDA and props["FrontendDomid"] == 1
    assert props["FrontendDomain"] == "work"
    assert props["Source"] == str(image)
    assert loops_of(image) == [props["LoopDevice"].removeprefix("/dev/")]
    assert trio(stack, be) == {
        "physical-device": f"{props['Major']:x}:{props['Minor']:x}",
        "physical-device-path": props["LoopDevice"],
        "diskseq": f"{props['Diskseq']:x}",
    }
    # idempotent: the script may run twice; libxl's relative XENBUS_PATH names the same backend
    assert api.ok("Attach", "s", [be]) == export
    assert api.ok("Attach", "s", [be.removeprefix("/local/domain/0/")]) == export
    assert len(held_block_fds(stack)) == 1

    api.ok("Detach", "s", [be])
    assert trio(stack, be) == dict.fromkeys(trio(stack, be))  # removed, the rest is libxl's
    assert stack.xs_read(f"{be}/params") == str(image)
    assert api.err("Detach", "s", [be]) == "NotFound"
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_attach_to_a_re_created_backend_replaces_the_stale_export(stack: Stack, api: Api) -> None:
    """A remove that never reached policyd, then libxl writes the same backend path again (a new
    domain with the same domid and devid): Attach must not answer with the stale export, whose
    device the new nodes do not name; it drops it (freeing its loop device) and attaches anew."""
    old_image = stack.make_image("stale-old.img", content=b"OLD")
    new_image = stack.make_image("stale-new.img", content=b"NEW")
    be = write_libxl_vbd(stack, 1, XVDA, str(old_image))
    stale = str(api.ok("Attach", "s", [be]))
    remove_libxl_vbd(stack, be)  # libxl tore the device down; policyd never heard of it

    be = write_libxl_vbd(stack, 1, XVDA, str(new_image))
    fresh = str(api.ok("Attach", "s", [be]))
    assert fresh != stale
    props = api.props(fresh)
    assert props["Source"] == str(new_image)
    assert trio(stack, be)["physical-device"] == f"{props['Major']:x}:{props['Minor']:x}"
    assert stale not in api.managed()
    assert loops_released(old_image)  # the stale export's device is free again
    assert len(held_block_fds(stack)) == 1

    # the same params again, but the trio is gone (the directory was re-created): re-attached
    remove_libxl_vbd(stack, be)
    be = write_libxl_vbd(stack, 1, XVDA, str(new_image))
    again = str(api.ok("Attach", "s", [be]))
    assert again != fresh
    assert trio(stack, be)["physical-device"] is not None
    assert len(held_block_fds(stack)) == 1

    api.ok("Detach", "s", [be])
    remove_libxl_vbd(stack, be)
    assert_clean(stack, old_image, new_image)


def test_detach_tolerates_libxl_having_removed_the_backend(stack: Stack, api: Api) -> None:
    image = stack.make_image("attach-gone.img")
    be = write_libxl_vbd(stack, 2, XVDA, str(image))
    relative = be.removeprefix("/local/domain/0/")  # as libxl passes XENBUS_PATH
    api.ok("Attach", "s", [relative])
    remove_libxl_vbd(stack, be)
    api.ok("Detach", "s", [relative])
    assert_clean(stack, image)


def test_attach_of_a_backend_libxl_has_not_written(stack: Stack, api: Api) -> None:
    assert api.err("Attach", "s", [f"/local/domain/0/backend/vbd/1/{XVDA}"]) == "NotFound"
    assert_clean(stack)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "local/domain/0/backend/vbd/1/51712",
        "/local/domain/0/backend/vbd/1/51712/",
        "/local/domain/0/backend/vbd/1/51712/../51728",
        "/local/domain/0/backend/vif/1/0",
        "/local/domain/0/backend/vbd/01/51712",
        "/local/domain/0/backend/vbd/1/51713",  # a partition, not a disk
        "/local/domain/0/backend/vbd/99999/51712",
        "/local/domain/0/backend/vbd/1/" + "9" * 200,
        "/local/domain/3/backend/vbd/1/51712",  # another backend domain
        "/local/domain/0/backend/vbd/1/51712\n",
        "/local/domain/0/backend/vbd/1/5171\u0662",  # non-ASCII digit
    ],
)
def test_malformed_backend_paths(stack: Stack, api: Api, path: str) -> None:
    assert api.err("Attach", "s", [path]) == "InvalidArgument"
    assert api.err("Detach", "s", [path]) == "InvalidArgument"
    assert_clean(stack)


@pytest.mark.parametrize(
    ("junk", "error"),
    [
        ({"mode": "rw"}, "XenStore"),
        ({"mode": "w!"}, "XenStore"),
        ({"frontend-id": "2"}, "XenStore"),  # disagrees with the path
        ({"frontend-id": "1x"}, "XenStore"),
        ({"type": "phy;rm -rf"}, "XenStore"),
        ({"params": "relative/path.img"}, "XenStore"),
        ({"params": "/x/../etc/shadow"}, "XenStore"),
        # longer than the export policy's path grammar allows: denied before the broker is asked
        ({"params": "/" + "a" * 1000}, "PolicyDenied"),
        ({"params": "/etc/shadow"}, "Refused"),  # outside the broker's roots
        ({"params": "/nonexistent/disk.img"}, "Refused"),  # outside the roots, too
        ({"params": "{images}/nonexistent.img"}, "NotFound"),
    ],
)
def test_junk_in_libxl_nodes(stack: Stack, api: Api, junk: dict[str, str], error: str) -> None:
    image = stack.make_image("attach-junk.img")
    junk = {k: v.replace("{images}", str(stack.image_dir)) for k, v in junk.items()}
    be = write_libxl_vbd(stack, 1, XVDA, str(image), extra=junk)
    try:
        assert api.err("Attach", "s", [be]) == error
        assert trio(stack, be) == dict.fromkeys(trio(stack, be))
        assert api.managed() == {}
        assert loops_of(image) == [] and held_block_fds(stack) == []
    finally:
        remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


@pytest.mark.parametrize("raw", [b"/tmp/a\x01b.img", b"/tmp/\xc3\xa9.img", b"/tmp/a\xffb.img"])
def test_non_ascii_and_control_bytes_in_params(stack: Stack, api: Api, raw: bytes) -> None:
    image = stack.make_image("attach-raw.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    xs_write_raw(stack, f"{be}/params", raw)
    try:
        assert api.err("Attach", "s", [be]) == "XenStore"
        assert api.managed() == {} and held_block_fds(stack) == []
    finally:
        remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_attach_of_a_block_device(stack: Stack, api: Api) -> None:
    """params naming a block device is opened and verified by the broker, not looped again.
    Here it is the loop device of a file exported read-only, so it counts as that file: shared
    read-only, Busy read-write."""
    image = stack.make_image("attach-block.img")
    holder = api.export(image)  # gives us a block device to name (the broker allows major 7)
    loop = api.props(holder)["LoopDevice"]
    be = write_libxl_vbd(stack, 2, XVDA, loop)
    export = str(api.ok("Attach", "s", [be]))
    props = api.props(export)
    assert props["Source"] == loop
    assert (props["Major"], props["Minor"]) == (
        api.props(holder)["Major"],
        api.props(holder)["Minor"],
    )
    assert trio(stack, be)["physical-device-path"] == loop
    assert len(held_block_fds(stack)) == 1  # the same device, the same held fd
    api.ok("Detach", "s", [be])
    remove_libxl_vbd(stack, be)
    be = write_libxl_vbd(stack, 2, XVDA, loop, mode="w")
    assert api.err("Attach", "s", [be]) == "Busy"
    assert trio(stack, be) == dict.fromkeys(trio(stack, be))
    remove_libxl_vbd(stack, be)
    api.detach(holder)
    assert_clean(stack, image)


def test_attach_of_an_unshared_block_device(stack: Stack, api: Api) -> None:
    image = stack.make_image("attach-block-2.img")
    holder = api.export(image)
    loop = api.props(holder)["LoopDevice"]
    fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)  # keep the device while policyd lets go
    try:
        api.detach(holder)
        be = write_libxl_vbd(stack, 2, XVDA, loop)
        export = str(api.ok("Attach", "s", [be]))
        props = api.props(export)
        assert props["SourceKind"] == "block" and props["LoopDevice"] == ""
        assert held_block_fds(stack) == [(props["Major"], props["Minor"])]
        api.ok("Detach", "s", [be])
        remove_libxl_vbd(stack, be)
    finally:
        os.close(fd)
    assert_clean(stack, image)


def test_a_detach_that_races_a_late_attach_detaches_what_it_registers(
    stack: Stack, api: Api
) -> None:
    """libxl's remove can come while its add is still in policyd (here: the broker is stopped
    in the middle of the Attach). Detach looks the export up under the lock Attach holds, so it
    waits for the Attach and detaches what it registered: no export is left that no backend
    names, holding its loop device until policyd stops."""
    image = stack.make_image("race.img", content=b"RACE")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), mode="r")
    broker = stack.daemons["broker"].pid
    env = {**stack.env(), "XENBUS_PATH": be, "XENBUS_TYPE": "vbd", "XENBUS_BASE_PATH": "backend"}
    script = str(stack.config.venv / "bin/blockbroker-block")
    os.kill(broker, signal.SIGSTOP)
    try:
        add = subprocess.Popen([script, "add"], env=env, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the Attach waits for the stopped broker, holding the lock
        remove = subprocess.Popen([script, "remove"], env=env, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
    finally:
        os.kill(broker, signal.SIGCONT)
    assert add.wait(timeout=30) == 0, add.communicate()[1]
    assert remove.wait(timeout=30) == 0, remove.communicate()[1]
    assert api.managed() == {}
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)
