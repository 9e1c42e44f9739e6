"""Broker requests as the export operations make them: a deadline, a retry, named errors.

Unprivileged policyd code. The broker client (policyd.brokerclient) speaks the protocol; this
module bounds each request in time (BROKER_TIMEOUT_S), retries LOOP_BUSY a few times, maps the
broker's error codes to the D-Bus API's named errors, and tracks whether the broker answers (the
Manager's BrokerConnected property).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.protocol import ErrorCode
from policyd import brokerclient, errors, logfmt
from policyd.brokerclient import AsyncBrokerClient, BrokerError

T = TypeVar("T")
LOOP_BUSY_ATTEMPTS = 3
BROKER_TIMEOUT_S = 5.0  # a broker request takes milliseconds; far beyond that it is stuck

BROKER_ERRORS: dict[ErrorCode, type[errors.PolicydError]] = {
    ErrorCode.BAD_PATH: errors.InvalidArgument,
    ErrorCode.BAD_ARGUMENT: errors.InvalidArgument,
    ErrorCode.NOT_FOUND: errors.NotFound,
    ErrorCode.NOT_BLOCK_DEVICE: errors.InvalidArgument,
    ErrorCode.NOT_REGULAR_FILE: errors.InvalidArgument,
    ErrorCode.IDENTITY_MISMATCH: errors.DeviceChanged,
    ErrorCode.VERIFY_FAILED: errors.DeviceChanged,
    ErrorCode.LOOP_BUSY: errors.Busy,
    ErrorCode.IN_USE: errors.Refused,
    ErrorCode.UNAVAILABLE: errors.BrokerUnavailable,
    ErrorCode.PROTOCOL: errors.BrokerUnavailable,
    ErrorCode.INTERNAL: errors.Internal,
}


def broker_error(e: BrokerError, what: str) -> errors.PolicydError:
    cls = BROKER_ERRORS.get(e.code, errors.Refused)
    if cls is errors.BrokerUnavailable:
        return cls(f"the broker is unavailable ({e}); check blockbroker-broker.service")
    if cls is errors.Internal:  # the detail goes to the log, never onto the wire
        logfmt.error("broker internal error", what=what, detail=str(e))
        return cls("internal error in the broker; see the broker's and policyd's logs")
    return cls(f"broker refused {what}: {e}")


def _ignore_connected(connected: bool) -> None:
    pass


class BrokerCalls:
    """Runs broker requests for the export operations; `client` is the protocol client."""

    def __init__(
        self,
        client: AsyncBrokerClient,
        on_connected_changed: Callable[[bool], None] = _ignore_connected,
    ) -> None:
        self.client = client
        self.connected = False
        self._connected_changed = on_connected_changed

    async def __call__(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a broker request, bounded by BROKER_TIMEOUT_S. LOOP_BUSY (the broker's own
        bounded retry lost every race for a free loop device to other allocators) is retried a
        few times here, after a growing random pause, before it becomes Error.Busy."""
        for attempt in range(LOOP_BUSY_ATTEMPTS):
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):  # no extra task, unlike wait_for
                    result = await call()
            except TimeoutError:
                # The cancelled request dropped its connection (AsyncBrokerClient): a late
                # reply and its fd die with it. The next call reconnects, and times out the
                # same way until the broker answers again.
                self._set_connected(False)
                logfmt.warning("the broker does not answer; request abandoned", what=what)
                raise errors.BrokerUnavailable(
                    f"the broker did not answer within {BROKER_TIMEOUT_S:g} s; check "
                    "blockbroker-broker.service"
                ) from None
            except BrokerError as e:
                self._set_connected(not isinstance(e, brokerclient.BrokerUnavailable))
                if e.code == ErrorCode.LOOP_BUSY and attempt + 1 < LOOP_BUSY_ATTEMPTS:
                    logfmt.warning("no free loop device; retrying", what=what, attempt=attempt)
                    await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                    continue
                raise broker_error(e, what) from None
            self._set_connected(True)
            return result
        raise AssertionError("unreachable")

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._connected_changed(connected)

    def close(self) -> None:
        self.client.close()
