"""A hung xenstored does not hang policyd: the call fails with Error.XenStore, nothing is leaked,
and policyd reconnects once xenstored answers again.

Runs as root against a private real stack (its oxenstored is stopped with SIGSTOP mid-test).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
from harness.names import MANAGER, MANAGER_IFACE
from harness.stack import Stack, StackConfig
from policydlab import Api, assert_clean, held_block_fds

pytestmark = [pytest.mark.root, pytest.mark.daemon, pytest.mark.slow]


def test_hung_xenstored(stack_factory: Callable[[StackConfig], Stack]) -> None:
    stack = stack_factory(StackConfig(domains={"work": 1}))
    api = Api(stack.bus_address)
    try:
        image = stack.make_image("hang.img")
        first = api.export(image)  # a working connection, a held loop device
        xenstored = stack.daemons["oxenstored"].pid
        os.kill(xenstored, signal.SIGSTOP)
        try:
            assert api.export_err(stack.make_image("hang-2.img")) == "XenStore"
            assert api.props(MANAGER, MANAGER_IFACE)["XenStoreConnected"] is False
            assert len(held_block_fds(stack)) == 1  # only the first export's
        finally:
            os.kill(xenstored, signal.SIGCONT)
        second = api.export(stack.make_image("hang-3.img"))
        assert api.props(MANAGER, MANAGER_IFACE)["XenStoreConnected"] is True
        api.detach(first)
        api.detach(second)
        assert_clean(stack, image, stack.image_dir / "hang-2.img", stack.image_dir / "hang-3.img")
    finally:
        api.close()
