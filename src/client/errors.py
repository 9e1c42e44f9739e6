"""Every error the blockbroker client can raise, mapped 1:1 from D-Bus error names.

Runs in the calling user's process; holds no privilege. The service (policyd) answers with errors
named ``org.qubes.BlockBroker1.Error.<Name>``; each name has exactly one class here, and
`from_dbus` turns a name and message into an instance. A name this module does not know becomes
a plain `BlockBrokerError` that keeps the name, so nothing is lost when the service grows.

Besides the service's own names, the bus itself can answer (the service is not running, the bus
policy refused the call): those map to `ServiceUnavailable` and `BusAccessDenied`.

Each class carries the CLI exit status for it (`exit_status`); see docs/client.md.
SERVICE_ERRORS is pinned to policyd's error classes by tests/client/test_contract.py.
"""

from __future__ import annotations

from typing import ClassVar, Final

from client.model import ERROR_PREFIX as ERROR_PREFIX  # re-exported: errors name it

# CLI exit statuses (documented in docs/client.md).
EXIT_OK: Final = 0
EXIT_SERVICE_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_ACCESS_DENIED: Final = 4


class BlockBrokerError(Exception):
    """An error answered by the service (or the bus); `dbus_name` is the D-Bus error name."""

    name: ClassVar[str] = ""  # short name under ERROR_PREFIX; "" for the generic class
    exit_status: ClassVar[int] = EXIT_SERVICE_ERROR
    # What to do, appended by str(). Only for errors the client or the bus produce: policyd's
    # own messages already say what to do.
    hint: ClassVar[str] = ""

    def __init__(self, message: str = "", dbus_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.dbus_name = dbus_name or (ERROR_PREFIX + self.name if self.name else "")

    def __str__(self) -> str:
        text = f"{self.dbus_name}: {self.message}" if self.dbus_name else self.message
        return f"{text} ({self.hint})" if self.hint else text


class AccessDenied(BlockBrokerError):
    name = "AccessDenied"
    exit_status = EXIT_ACCESS_DENIED


class UnknownDomain(BlockBrokerError):
    name = "UnknownDomain"


class NotFound(BlockBrokerError):
    name = "NotFound"


class InvalidArgument(BlockBrokerError):
    name = "InvalidArgument"


class Refused(BlockBrokerError):
    name = "Refused"


class Busy(BlockBrokerError):
    name = "Busy"


class DeviceChanged(BlockBrokerError):
    name = "DeviceChanged"


class XenStore(BlockBrokerError):
    name = "XenStore"


class BrokerUnavailable(BlockBrokerError):
    name = "BrokerUnavailable"
    exit_status = EXIT_UNREACHABLE


class PolicyDenied(BlockBrokerError):
    name = "PolicyDenied"
    exit_status = EXIT_ACCESS_DENIED


class Expired(BlockBrokerError):
    name = "Expired"


class Internal(BlockBrokerError):
    name = "Internal"


class ServiceUnavailable(BlockBrokerError):
    """The bus is not reachable, or nobody owns org.qubes.BlockBroker1, or it did not answer."""

    exit_status = EXIT_UNREACHABLE
    hint = "is policyd running? is DBUS_SYSTEM_BUS_ADDRESS right?"


class BusAccessDenied(AccessDenied):
    """The bus policy (not policyd) refused the call: org.freedesktop.DBus.Error.AccessDenied."""

    hint = "the D-Bus policy does not allow this caller; run as root"


class UnknownObject(NotFound):
    """No such object (an export that is gone): org.freedesktop.DBus.Error.UnknownObject."""


class UsageError(BlockBrokerError):
    """The caller's own input is wrong; raised before anything is sent. CLI exit status 2."""

    exit_status = EXIT_USAGE


SERVICE_ERRORS: Final[dict[str, type[BlockBrokerError]]] = {
    ERROR_PREFIX + cls.name: cls
    for cls in (
        AccessDenied,
        UnknownDomain,
        NotFound,
        InvalidArgument,
        Refused,
        Busy,
        DeviceChanged,
        XenStore,
        BrokerUnavailable,
        PolicyDenied,
        Expired,
        Internal,
    )
}

BUS_ERRORS: Final[dict[str, type[BlockBrokerError]]] = {
    "org.freedesktop.DBus.Error.ServiceUnknown": ServiceUnavailable,
    "org.freedesktop.DBus.Error.NameHasNoOwner": ServiceUnavailable,
    "org.freedesktop.DBus.Error.NoReply": ServiceUnavailable,
    "org.freedesktop.DBus.Error.Timeout": ServiceUnavailable,
    "org.freedesktop.DBus.Error.Disconnected": ServiceUnavailable,
    "org.freedesktop.DBus.Error.NoServer": ServiceUnavailable,
    "org.freedesktop.DBus.Error.AccessDenied": BusAccessDenied,
    "org.freedesktop.DBus.Error.UnknownObject": UnknownObject,
}


def from_dbus(dbus_name: str, message: str) -> BlockBrokerError:
    """The exception for a D-Bus error reply; unknown names give a generic BlockBrokerError."""
    cls = SERVICE_ERRORS.get(dbus_name) or BUS_ERRORS.get(dbus_name) or BlockBrokerError
    return cls(message, dbus_name=dbus_name)
