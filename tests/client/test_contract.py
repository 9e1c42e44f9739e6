"""The client's copy of the bus contract is policyd's.

The client keeps its own constants (client/model.py) and error list (client/errors.py): the
VM-side tools must not import policyd. These tests pin them to policyd.names and to policyd's
error classes, so neither side can change a name alone.
"""

from __future__ import annotations

import pytest

from client import bridge, errors, model, watch
from policyd import errors as policyd_errors
from policyd import names

CONTRACT = [
    "BUS_NAME",
    "MANAGER_PATH",
    "MANAGER_IFACE",
    "EXPORT_IFACE",
    "REQUEST_IFACE",
    "EXPORT_PATH_PREFIX",
    "REQUEST_PATH_PREFIX",
    "ERROR_PREFIX",
]


@pytest.mark.parametrize("name", CONTRACT)
def test_client_constant_is_policyds(name: str) -> None:
    assert getattr(model, name) == getattr(names, name)


def test_bridge_and_watch_use_the_one_copy() -> None:
    for name in ("BUS_NAME", "MANAGER_PATH", "MANAGER_IFACE", "REQUEST_IFACE"):
        assert getattr(bridge, name) is getattr(model, name)
    assert bridge.REQUEST_PATH_PREFIX is model.REQUEST_PATH_PREFIX
    assert bridge.ERROR_PREFIX is errors.ERROR_PREFIX is model.ERROR_PREFIX
    assert watch.OBJECT_MANAGER_IFACE == names.OBJECT_MANAGER_IFACE


def daemon_error_names() -> set[str]:
    """Every D-Bus error name policyd can answer with: its PolicydError classes, recursively."""
    found: set[str] = set()
    pending: list[type[policyd_errors.PolicydError]] = [policyd_errors.PolicydError]
    while pending:
        cls = pending.pop()
        found.add(names.ERROR_PREFIX + cls.name)
        pending.extend(cls.__subclasses__())
    return found


def test_client_knows_exactly_the_daemons_errors() -> None:
    assert set(errors.SERVICE_ERRORS) == daemon_error_names()


def test_each_client_error_class_carries_its_name() -> None:
    for dbus_name, cls in errors.SERVICE_ERRORS.items():
        assert cls().dbus_name == dbus_name
