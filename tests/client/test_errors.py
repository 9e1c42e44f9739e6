"""Unit: D-Bus error names map 1:1 to exception classes; unknown names keep their name."""

from __future__ import annotations

import pytest

from client import errors

CONTRACT_NAMES = [
    "AccessDenied",
    "UnknownDomain",
    "NotFound",
    "InvalidArgument",
    "Refused",
    "Busy",
    "DeviceChanged",
    "XenStore",
    "BrokerUnavailable",
    "PolicyDenied",
    "Expired",
    "Internal",
]


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_each_contract_name_has_its_own_class(name: str) -> None:
    dbus_name = errors.ERROR_PREFIX + name
    exc = errors.from_dbus(dbus_name, "the message")
    assert type(exc).__name__ == name
    assert type(exc) is getattr(errors, name)
    assert exc.dbus_name == dbus_name
    assert exc.message == "the message"
    assert str(exc).startswith(f"{dbus_name}: the message")


def test_mapping_is_one_to_one() -> None:
    classes = list(errors.SERVICE_ERRORS.values())
    assert len(set(classes)) == len(classes) == len(CONTRACT_NAMES)
    assert sorted(c.name for c in classes) == sorted(CONTRACT_NAMES)


def test_unknown_service_error_is_generic_and_keeps_its_name() -> None:
    exc = errors.from_dbus("org.qubes.BlockBroker1.Error.SomethingNew", "later version")
    assert type(exc) is errors.BlockBrokerError
    assert exc.dbus_name == "org.qubes.BlockBroker1.Error.SomethingNew"
    assert str(exc) == "org.qubes.BlockBroker1.Error.SomethingNew: later version"
    assert exc.exit_status == errors.EXIT_SERVICE_ERROR


@pytest.mark.parametrize(
    ("dbus_name", "cls", "status"),
    [
        ("org.freedesktop.DBus.Error.ServiceUnknown", errors.ServiceUnavailable, 3),
        ("org.freedesktop.DBus.Error.NameHasNoOwner", errors.ServiceUnavailable, 3),
        ("org.freedesktop.DBus.Error.NoReply", errors.ServiceUnavailable, 3),
        ("org.freedesktop.DBus.Error.AccessDenied", errors.BusAccessDenied, 4),
        ("org.freedesktop.DBus.Error.UnknownObject", errors.UnknownObject, 1),
        ("org.qubes.BlockBroker1.Error.AccessDenied", errors.AccessDenied, 4),
        ("org.qubes.BlockBroker1.Error.PolicyDenied", errors.PolicyDenied, 4),
        ("org.qubes.BlockBroker1.Error.BrokerUnavailable", errors.BrokerUnavailable, 3),
        ("org.qubes.BlockBroker1.Error.NotFound", errors.NotFound, 1),
        ("org.freedesktop.DBus.Error.UnknownMethod", errors.BlockBrokerError, 1),
    ],
)
def test_bus_errors_and_exit_statuses(
    dbus_name: str, cls: type[errors.BlockBrokerError], status: int
) -> None:
    exc = errors.from_dbus(dbus_name, "m")
    assert type(exc) is cls
    assert exc.exit_status == status


def test_every_error_is_a_blockbroker_error() -> None:
    assert issubclass(errors.BusAccessDenied, errors.AccessDenied)
    assert issubclass(errors.UnknownObject, errors.NotFound)
    for cls in [*errors.SERVICE_ERRORS.values(), *errors.BUS_ERRORS.values(), errors.UsageError]:
        assert issubclass(cls, errors.BlockBrokerError)
    assert errors.UsageError("x").exit_status == errors.EXIT_USAGE
