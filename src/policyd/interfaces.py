"""The D-Bus interfaces' shapes: properties (served by dbus-fast) and method declarations.

Unprivileged policyd code. The methods declared here only define the introspection data (which
a test compares with dbus/*.xml); calls never reach their bodies, because policyd.service
dispatches every method call of these interfaces itself, after checking the caller (dbus-fast's
decorated methods do not expose the sender). No `from __future__ import annotations` here:
dbus-fast reads these annotations at import time and takes a postponed "None" for a signature.
"""

from typing import Any, NoReturn

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import (
    DBusBool,
    DBusDict,
    DBusObjectPath,
    DBusStr,
    DBusUInt32,
    DBusUInt64,
    DBusUnixFd,
)
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from policyd import errors
from policyd.registry import ExportRecord

BUS_NAME = "org.qubes.BlockBroker1"
MANAGER_PATH = "/org/qubes/BlockBroker1"
EXPORT_PATH_PREFIX = MANAGER_PATH + "/export/"
MANAGER_IFACE = "org.qubes.BlockBroker1.Manager"
EXPORT_IFACE = "org.qubes.BlockBroker1.Export"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"


def not_dispatched() -> NoReturn:
    raise errors.Internal("method call was not dispatched")


class ManagerState:
    """What the Manager's properties show; kept up to date by policyd.service."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.export_count = 0
        self.broker_connected = False
        self.xenstore_connected = False


class ManagerInterface(ServiceInterface):
    def __init__(self, state: ManagerState) -> None:
        super().__init__(MANAGER_IFACE)
        self.state = state

    @dbus_method()
    def Attach(self, backend_path: DBusStr) -> DBusObjectPath:
        not_dispatched()

    @dbus_method()
    def Detach(self, backend_path: DBusStr) -> None:
        not_dispatched()

    @dbus_method()
    def Export(self, path: DBusStr, frontend_domain: DBusStr, options: DBusDict) -> DBusObjectPath:
        not_dispatched()

    @dbus_method()
    def ExportFd(
        self, fd: DBusUnixFd, frontend_domain: DBusStr, options: DBusDict
    ) -> DBusObjectPath:
        not_dispatched()

    @dbus_method()
    def DetachExport(self, export: DBusObjectPath) -> None:
        not_dispatched()

    @dbus_method()
    def RequestExport(
        self,
        source_domain: DBusStr,
        device: DBusDict,
        target_domain: DBusStr,
        options: DBusDict,
    ) -> DBusObjectPath:
        not_dispatched()

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return self.state.version

    @dbus_property(access=PropertyAccess.READ)
    def ExportCount(self) -> DBusUInt32:
        return self.state.export_count

    @dbus_property(access=PropertyAccess.READ)
    def BrokerConnected(self) -> DBusBool:
        return self.state.broker_connected

    @dbus_property(access=PropertyAccess.READ)
    def XenStoreConnected(self) -> DBusBool:
        return self.state.xenstore_connected

    def values(self, names: list[str]) -> dict[str, Any]:
        all_values = {
            "Version": self.state.version,
            "ExportCount": self.state.export_count,
            "BrokerConnected": self.state.broker_connected,
            "XenStoreConnected": self.state.xenstore_connected,
        }
        return {name: all_values[name] for name in names}


EXPORT_SIGNATURES = {
    "Source": "s",
    "SourceKind": "s",
    "BackendDomain": "s",
    "BackendDomid": "u",
    "FrontendDomain": "s",
    "FrontendDomid": "u",
    "Devid": "u",
    "BackendPath": "s",
    "LoopDevice": "s",
    "Major": "u",
    "Minor": "u",
    "Diskseq": "t",
    "Mode": "s",
    "State": "s",
    "Since": "t",
}


def export_values(record: ExportRecord) -> dict[str, Any]:
    ident = record.backing.identity
    return {
        "Source": record.source,
        "SourceKind": record.backing.kind,
        "BackendDomain": record.backend_domain,
        "BackendDomid": record.backend_domid,
        "FrontendDomain": record.frontend_domain,
        "FrontendDomid": record.frontend_domid,
        "Devid": record.devid,
        "BackendPath": record.backend_path,
        "LoopDevice": record.backing.loop_device,
        "Major": ident.major,
        "Minor": ident.minor,
        "Diskseq": ident.diskseq,
        "Mode": record.mode,
        "State": record.state,
        "Since": record.since_us,
    }


def export_variants(record: ExportRecord) -> dict[str, Variant]:
    return {k: Variant(EXPORT_SIGNATURES[k], v) for k, v in export_values(record).items()}


class ExportInterface(ServiceInterface):
    def __init__(self, record: ExportRecord) -> None:
        super().__init__(EXPORT_IFACE)
        self.record = record

    @dbus_method()
    def Detach(self) -> None:
        not_dispatched()

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> DBusStr:
        return self.record.source

    @dbus_property(access=PropertyAccess.READ)
    def SourceKind(self) -> DBusStr:
        return self.record.backing.kind

    @dbus_property(access=PropertyAccess.READ)
    def BackendDomain(self) -> DBusStr:
        return self.record.backend_domain

    @dbus_property(access=PropertyAccess.READ)
    def BackendDomid(self) -> DBusUInt32:
        return self.record.backend_domid

    @dbus_property(access=PropertyAccess.READ)
    def FrontendDomain(self) -> DBusStr:
        return self.record.frontend_domain

    @dbus_property(access=PropertyAccess.READ)
    def FrontendDomid(self) -> DBusUInt32:
        return self.record.frontend_domid

    @dbus_property(access=PropertyAccess.READ)
    def Devid(self) -> DBusUInt32:
        return self.record.devid

    @dbus_property(access=PropertyAccess.READ)
    def BackendPath(self) -> DBusStr:
        return self.record.backend_path

    @dbus_property(access=PropertyAccess.READ)
    def LoopDevice(self) -> DBusStr:
        return self.record.backing.loop_device

    @dbus_property(access=PropertyAccess.READ)
    def Major(self) -> DBusUInt32:
        return self.record.backing.identity.major

    @dbus_property(access=PropertyAccess.READ)
    def Minor(self) -> DBusUInt32:
        return self.record.backing.identity.minor

    @dbus_property(access=PropertyAccess.READ)
    def Diskseq(self) -> DBusUInt64:
        return self.record.backing.identity.diskseq

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return self.record.mode

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.record.state

    @dbus_property(access=PropertyAccess.READ)
    def Since(self) -> DBusUInt64:
        return self.record.since_us
