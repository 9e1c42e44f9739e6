"""A hung broker does not hang policyd: the call fails with Error.BrokerUnavailable within a
bounded time, nothing leaks, and later calls fail the same way instead of queueing forever.

Runs as root against a private real stack. Its broker is stopped with SIGSTOP and then killed:
resuming it with SIGCONT is not possible today, because the kernel restarts its interrupted
poll() through restart_syscall, which the broker's seccomp allowlist does not contain (it dies
of SIGSYS; reported to the broker's owner).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
from harness.loops import loops_released
from harness.names import MANAGER, MANAGER_IFACE
from harness.stack import Stack, StackConfig
from policydlab import Api, held_block_fds, vbd_nodes

pytestmark = [pytest.mark.root, pytest.mark.daemon, pytest.mark.slow]


def test_hung_broker(stack_factory: Callable[[StackConfig], Stack]) -> None:
    stack = stack_factory(StackConfig(domains={"work": 1}))
    api = Api(stack.bus_address)
    try:
        first = stack.make_image("broker-hang-1.img")
        late = stack.make_image("broker-hang-2.img")
        api.detach(api.export(first))  # the broker connection is up
        broker = stack.daemons.pop("broker")  # this test ends it on purpose
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            assert api.export_err(late) == "BrokerUnavailable"
            assert api.props(MANAGER, MANAGER_IFACE)["BrokerConnected"] is False
            assert api.export_err(first) == "BrokerUnavailable"  # queued behind it, bounded
        finally:
            os.kill(broker.pid, signal.SIGKILL)
            assert broker.proc is not None
            broker.proc.wait()
        assert api.export_err(first) == "BrokerUnavailable"  # no broker at all: at once
        assert held_block_fds(stack) == [] and vbd_nodes(stack) == []
        assert loops_released(first) and loops_released(late)
    finally:
        api.close()
