"""State: "waiting-for-blkback" until blkback's sysfs `physical_device` shows the exported
device, then "connected" (with PropertiesChanged); "no-blkback" on a host without xen-backend.

Runs as root against the real stack with the harness's sysfs stand-in for xen-blkback (the Xen
lane runs the same code against the real /sys).
"""

from __future__ import annotations

import time

import pytest
from harness.names import EXPORT_IFACE
from harness.stack import Stack, StackConfig
from policydlab import Api, assert_clean

pytestmark = [pytest.mark.root, pytest.mark.daemon]

SETTLE_S = 10.0  # bound on waiting for the poller (interval 0.1 s); not a timing assertion


@pytest.fixture(scope="module")
def stack_config() -> StackConfig:
    return StackConfig(domains={"work": 1, "untrusted": 2}, sysfs_blkback=True)


def wait_state(api: Api, export: str, state: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while api.props(export)["State"] != state:
        assert time.monotonic() < deadline, f"{export} never reached {state}"
        time.sleep(0.02)


def test_waiting_then_connected(stack: Stack, api: Api) -> None:
    image = stack.make_image("blkback.img")
    export = api.export(image)
    props = api.props(export)
    assert props["State"] == "waiting-for-blkback"
    # blkback opens some other device first: still waiting
    stack.blkback_open(1, props["Devid"], 7, props["Minor"] + 1000)
    stack.blkback_open(1, props["Devid"], props["Major"], props["Minor"])
    wait_state(api, export, "connected")
    api.pump()
    changes = [
        s.body[1]["State"].value
        for s in api.signals
        if s.member == "PropertiesChanged" and s.path == export and s.body[0] == EXPORT_IFACE
    ]
    assert changes == ["connected"]
    # Detach of a connected export asks the backend to close first (online=0, state=5) and
    # goes on once blkback has let go (its sysfs node is gone) or the backend is Closed.
    stack.blkback_close(1, props["Devid"])
    api.detach(export)
    assert_clean(stack, image)


def test_a_stale_node_for_another_device_does_not_count(stack: Stack, api: Api) -> None:
    image = stack.make_image("blkback-quick.img")
    stack.blkback_open(2, 51728, 8, 4095)  # stale node for another device: must not count
    export = api.export(image, "untrusted")
    assert api.props(export)["Devid"] == 51728
    assert api.props(export)["State"] == "waiting-for-blkback"
    props = api.props(export)
    stack.blkback_open(2, 51728, props["Major"], props["Minor"])
    wait_state(api, export, "connected")
    stack.blkback_close(2, 51728)
    api.detach(export)
    assert_clean(stack, image)
