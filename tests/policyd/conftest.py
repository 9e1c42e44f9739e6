"""policyd's tests use the shared host stack (tests/harness): real oxenstored, the project's bus
policy on a private dbus-daemon, the real broker (root) and policyd as user blockbroker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness.fixtures import stack, stack_config, stack_factory  # noqa: F401
from harness.stack import Stack
from policydlab import Api


@pytest.fixture
def api(stack: Stack) -> Iterator[Api]:  # noqa: F811
    client = Api(stack.bus_address)
    yield client
    client.close()
