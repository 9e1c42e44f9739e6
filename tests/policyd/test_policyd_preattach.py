"""Pre-attach: policyd starts the Attach when libxl writes a backend for blockbroker-block.

The nodes are written as libxl's device_disk_add writes them (one transaction); the script's
Attach then gets that same export (one loop device, one held fd). A pre-attach no script claims
is released when its backend goes or after --pre-attach-claim seconds, a claimed one when its
backend goes without a Detach (after a grace); a backend for another script is left alone.
libxl's removal (online = 0) detaches an Attach export before the script's `remove`, whose
Detach then finds nothing (NotFound, which the script takes as success).
Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from harness import xenstore
from harness.loops import loops_of, loops_released
from harness.stack import Stack, StackConfig
from policydlab import (
    XVDA,
    Api,
    assert_clean,
    held_block_fds,
    remove_libxl_vbd,
    write_libxl_vbd,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

CLAIM_S = 2.0  # this module's --pre-attach-claim
SETTLE_S = 10.0  # bound on waiting for policyd to react; not a timing assertion
XVDB = XVDA + 16


@pytest.fixture(scope="module")
def stack_config() -> StackConfig:
    return StackConfig(
        domains={"work": 1, "untrusted": 2}, policyd_args=["--pre-attach-claim", str(CLAIM_S)]
    )


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def exports_at(api: Api, be: str) -> list[str]:
    return [path for path, props in api.managed().items() if props.get("BackendPath") == be]


def test_pre_attach_then_the_scripts_attach_gets_it(stack: Stack, api: Api) -> None:
    image = stack.make_image("pre.img", content=b"PRE")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    wait_for("the pre-attach", lambda: stack.xs_read(f"{be}/physical-device") is not None)
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    [pre] = exports_at(api, be)
    assert len(loops_of(image)) == 1 and len(held_block_fds(stack)) == 1

    assert str(api.ok("Attach", "s", [be])) == pre  # the script's call: the same export
    assert str(api.ok("Attach", "s", [be.removeprefix("/local/domain/0/")])) == pre
    assert len(loops_of(image)) == 1 and len(held_block_fds(stack)) == 1
    time.sleep(CLAIM_S + 0.5)  # claimed: the claim deadline no longer applies
    assert exports_at(api, be) == [pre]
    props = api.props(pre)
    assert stack.xs_read(f"{be}/physical-device") == f"{props['Major']:x}:{props['Minor']:x}"

    api.ok("Detach", "s", [be])
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_the_scripts_add_during_the_pre_attach_gets_that_export(stack: Stack, api: Api) -> None:
    """The broker is stopped, so the pre-attach waits in its open, holding the exporter's lock;
    the script's `add` comes then and waits for it. The pre-attach's commit is sent after the
    request came, so the script gets that export without reading the nodes again (the claim
    without a re-read): one export, one loop device, the device XenStore names, and claimed
    (the claim deadline no longer applies)."""
    image = stack.make_image("during.img", content=b"DURING")
    broker = stack.daemons["broker"].pid
    script = str(stack.config.venv / "bin/blockbroker-block")
    os.kill(broker, signal.SIGSTOP)
    try:
        be = write_libxl_vbd(stack, 1, XVDA, str(image))
        env = {
            **stack.env(),
            "XENBUS_PATH": be,
            "XENBUS_TYPE": "vbd",
            "XENBUS_BASE_PATH": "backend",
        }
        time.sleep(0.5)  # the pre-attach is in the broker's open
        assert stack.xs_read(f"{be}/physical-device") is None
        add = subprocess.Popen([script, "add"], env=env, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the script's Attach waits for the lock
    finally:
        os.kill(broker, signal.SIGCONT)
    assert add.wait(timeout=30) == 0, add.communicate()[1]
    [export] = exports_at(api, be)
    assert len(loops_of(image)) == 1 and len(held_block_fds(stack)) == 1
    props = api.props(export)
    assert stack.xs_read(f"{be}/physical-device") == f"{props['Major']:x}:{props['Minor']:x}"
    time.sleep(CLAIM_S + 0.5)  # claimed by the script's Attach: not released
    assert exports_at(api, be) == [export]
    api.ok("Detach", "s", [be])
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_attach_racing_the_pre_attach_makes_one_export(stack: Stack, api: Api) -> None:
    """The script's Attach right behind libxl's write (the pre-attach in flight, or not begun):
    one export, one loop device, whoever came first."""
    image = stack.make_image("race.img", content=b"RACE")
    for _ in range(10):
        be = write_libxl_vbd(stack, 1, XVDA, str(image))
        export = str(api.ok("Attach", "s", [be]))
        assert exports_at(api, be) == [export]
        assert len(loops_of(image)) == 1 and len(held_block_fds(stack)) == 1
        props = api.props(export)
        assert stack.xs_read(f"{be}/physical-device") == f"{props['Major']:x}:{props['Minor']:x}"
        api.ok("Detach", "s", [be])
        remove_libxl_vbd(stack, be)
        assert_clean(stack, image)


def test_backend_removed_before_the_script_releases_everything(stack: Stack, api: Api) -> None:
    image = stack.make_image("gone.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    wait_for("the pre-attach", lambda: len(exports_at(api, be)) == 1)
    remove_libxl_vbd(stack, be)  # libxl gave up before it spawned the script
    wait_for("the release", lambda: not held_block_fds(stack) and loops_released(image))
    assert exports_at(api, be) == []
    # a script that comes late after all finds no backend: NotFound, nothing made
    assert api.err("Attach", "s", [be]) == "NotFound"
    assert api.err("Detach", "s", [be]) == "NotFound"
    assert_clean(stack, image)


def test_a_claimed_export_whose_backend_goes_without_a_detach_is_released(
    stack: Stack, api: Api
) -> None:
    """libxl deletes the backend after a `remove` that failed or was killed (or never reached
    policyd): no Detach comes, and after the grace policyd detaches the export itself."""
    image = stack.make_image("orphan.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    [export] = [str(api.ok("Attach", "s", [be]))]  # claimed: no claim deadline
    assert exports_at(api, be) == [export]
    remove_libxl_vbd(stack, be)
    wait_for("the release", lambda: not held_block_fds(stack) and loops_released(image))
    assert exports_at(api, be) == []
    assert api.err("Detach", "s", [be]) == "NotFound"  # the script takes it as success
    assert_clean(stack, image)


@pytest.mark.parametrize("claimed", [False, True], ids=["pre-attached", "claimed"])
def test_a_removed_frontend_subtree_releases_its_exports(
    stack: Stack, api: Api, claimed: bool
) -> None:
    """The whole frontend's dir removed at once: pre-attaches no script claimed are released,
    and claimed exports (no Detach came) after the grace."""
    a, b = stack.make_image(f"sub-a-{claimed}.img"), stack.make_image(f"sub-b-{claimed}.img")
    be_a = write_libxl_vbd(stack, 2, XVDA, str(a))
    be_b = write_libxl_vbd(stack, 2, XVDB, str(b))
    if claimed:
        for be in (be_a, be_b):
            api.ok("Attach", "s", [be])
    wait_for("both exports", lambda: len(held_block_fds(stack)) == 2)
    for be in (be_a, be_b):
        fe = stack.xs_read(f"{be}/frontend")
        assert fe is not None
        stack.xs_rm(fe)
    stack.xs_rm("/local/domain/0/backend/vbd/2")
    wait_for("the release", lambda: not held_block_fds(stack))
    assert loops_released(a) and loops_released(b)
    assert_clean(stack, a, b)


def test_a_script_that_never_comes_releases_the_device(stack: Stack, api: Api) -> None:
    image = stack.make_image("never.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    wait_for("the pre-attach", lambda: len(exports_at(api, be)) == 1)
    started = time.monotonic()
    wait_for("the claim deadline", lambda: not held_block_fds(stack))
    assert time.monotonic() - started < CLAIM_S + 2.0
    assert loops_released(image) and exports_at(api, be) == []
    for node in ("physical-device", "physical-device-path", "diskseq", "hotplug-status"):
        assert stack.xs_read(f"{be}/{node}") is None, node
    assert stack.xs_read(f"{be}/params") == str(image)  # libxl's nodes are libxl's

    # the script after all, late: a fresh Attach
    export = str(api.ok("Attach", "s", [be]))
    assert len(loops_of(image)) == 1
    api.ok("Detach", "s", [be])
    assert exports_at(api, be) == [] and export not in api.managed()
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


@pytest.mark.parametrize(
    "script", ["/etc/xen/scripts/block", "/etc/xen/scripts/blockbroker-block-old", "blockbroker"]
)
def test_another_script_is_left_alone(stack: Stack, api: Api, script: str) -> None:
    image = stack.make_image("other.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), extra={"script": script})
    marker = write_libxl_vbd(stack, 2, XVDA, str(stack.make_image("marker.img")))
    # the watch handles events in order: once the later backend is pre-attached, the first
    # one has been looked at
    wait_for("the later pre-attach", lambda: len(exports_at(api, marker)) == 1)
    assert exports_at(api, be) == [] and stack.xs_read(f"{be}/physical-device") is None
    assert len(held_block_fds(stack)) == 1
    remove_libxl_vbd(stack, marker)
    wait_for("the release", lambda: not held_block_fds(stack))
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_junk_nodes_pre_attach_nothing(stack: Stack, api: Api) -> None:
    """A backend whose nodes Attach refuses: no pre-attach, and the script's Attach fails as
    it always did, with the same error."""
    image = stack.make_image("junk.img")
    be = write_libxl_vbd(stack, 1, XVDA, "relative/path.img")
    marker = write_libxl_vbd(stack, 2, XVDA, str(image))
    wait_for("the later pre-attach", lambda: len(exports_at(api, marker)) == 1)
    assert exports_at(api, be) == [] and stack.xs_read(f"{be}/physical-device") is None
    assert api.err("Attach", "s", [be]) == "XenStore"
    remove_libxl_vbd(stack, marker)
    remove_libxl_vbd(stack, be)
    wait_for("the release", lambda: not held_block_fds(stack))
    assert_clean(stack, image)


def test_libxl_remove_detaches_before_the_script(stack: Stack, api: Api) -> None:
    image = stack.make_image("offline.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    export = str(api.ok("Attach", "s", [be]))
    xenstore.begin_libxl_remove(stack.xs, be)  # online = 0, state Closing
    wait_for("the detach", lambda: not held_block_fds(stack))
    assert loops_released(image) and export not in api.managed()
    for node in ("physical-device", "physical-device-path", "diskseq"):
        assert stack.xs_read(f"{be}/{node}") is None, node
    assert api.err("Detach", "s", [be]) == "NotFound"  # the script's remove: success
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_online_written_back_to_1_keeps_the_export(stack: Stack, api: Api) -> None:
    """Only online = 0 means libxl is removing the device."""
    image = stack.make_image("online1.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    export = str(api.ok("Attach", "s", [be]))
    stack.xs_write(f"{be}/online", "1")
    marker = write_libxl_vbd(stack, 2, XVDA, str(stack.make_image("marker2.img")))
    wait_for("the later pre-attach", lambda: len(exports_at(api, marker)) == 1)
    assert exports_at(api, be) == [export] and len(held_block_fds(stack)) == 2
    for path in (be, marker):
        api.ok("Detach", "s", [path])
        remove_libxl_vbd(stack, path)
    assert_clean(stack, image)


@pytest.mark.parametrize("libxl_remove", [False, True])
def test_a_detached_backend_is_not_pre_attached_again(
    stack: Stack, api: Api, libxl_remove: bool
) -> None:
    """Detach removes the trio from a backend that still names blockbroker-block: that is no
    new backend, and nothing attaches it again (with or without libxl's online = 0)."""
    image = stack.make_image("again.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image))
    api.ok("Attach", "s", [be])
    if libxl_remove:
        xenstore.begin_libxl_remove(stack.xs, be)
        wait_for("the detach", lambda: not held_block_fds(stack))
    else:
        api.ok("Detach", "s", [be])
    marker = write_libxl_vbd(stack, 2, XVDA, str(stack.make_image("marker3.img")))
    wait_for("the later pre-attach", lambda: len(exports_at(api, marker)) == 1)
    assert exports_at(api, be) == [] and stack.xs_read(f"{be}/physical-device") is None
    assert loops_released(image) and len(held_block_fds(stack)) == 1
    api.ok("Detach", "s", [marker])
    for path in (be, marker):
        remove_libxl_vbd(stack, path)
    assert_clean(stack, image)


def test_nodes_changed_after_the_pre_attach(stack: Stack, api: Api) -> None:
    """The script's Attach finds params no longer what was pre-attached: the pre-attach is
    released (its trio removed with it) and the Attach is done afresh; if the nodes are junk by
    then, the Attach fails and the pre-attach is released all the same."""
    a, b = stack.make_image("chg-a.img"), stack.make_image("chg-b.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(a))
    wait_for("the pre-attach", lambda: len(exports_at(api, be)) == 1)
    stack.xs_write(f"{be}/params", str(b))
    export = str(api.ok("Attach", "s", [be]))
    assert api.props(export)["Source"] == str(b)
    assert loops_released(a) and len(held_block_fds(stack)) == 1
    api.ok("Detach", "s", [be])
    remove_libxl_vbd(stack, be)

    be = write_libxl_vbd(stack, 1, XVDA, str(a))
    wait_for("the pre-attach", lambda: len(exports_at(api, be)) == 1)
    stack.xs_write(f"{be}/params", "relative.img")
    assert api.err("Attach", "s", [be]) == "XenStore"
    assert exports_at(api, be) == [] and held_block_fds(stack) == []
    assert stack.xs_read(f"{be}/physical-device") is None
    assert stack.xs_read(f"{be}/hotplug-status") is None
    remove_libxl_vbd(stack, be)
    assert_clean(stack, a, b)
