"""The D-Bus interfaces' shapes: Manager, Export and Request, their properties and methods.

Unprivileged policyd code. The methods declared here only define the introspection data (which
a test compares with dbus/*.xml); calls never reach their bodies, because policyd.bus.service
dispatches every method call of these interfaces itself, after checking the caller (dbus-fast's
decorated methods do not expose the sender). What a Request shows was validated before the
request was made, but its Description is still the VM's own text, which clients show as
untrusted. No `from __future__ import annotations` here: dbus-fast reads these annotations at
import time and takes a postponed "None" for a signature.
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
from policyd.exports.registry import ExportRecord
from policyd.names import EXPORT_IFACE, MANAGER_IFACE, REQUEST_IFACE
from policyd.requests.model import PendingRequest


def not_dispatched() -> NoReturn:
    raise errors.Internal("method call was not dispatched")


class ManagerInterface(ServiceInterface):
    """org.qubes.BlockBroker1.Manager: the methods, and policyd's state in four properties."""

    def __init__(self, version: str) -> None:
        super().__init__(MANAGER_IFACE)
        self.state: dict[str, Any] = {
            "Version": version,
            "ExportCount": 0,
            "BrokerConnected": False,
            "XenStoreConnected": False,
        }

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
        return self.state["Version"]  # type: ignore[no-any-return]

    @dbus_property(access=PropertyAccess.READ)
    def ExportCount(self) -> DBusUInt32:
        return self.state["ExportCount"]  # type: ignore[no-any-return]

    @dbus_property(access=PropertyAccess.READ)
    def BrokerConnected(self) -> DBusBool:
        return self.state["BrokerConnected"]  # type: ignore[no-any-return]

    @dbus_property(access=PropertyAccess.READ)
    def XenStoreConnected(self) -> DBusBool:
        return self.state["XenStoreConnected"]  # type: ignore[no-any-return]

    def update(self, **values: Any) -> None:
        """Set properties and announce them (PropertiesChanged); callers pass only changes."""
        self.state.update(values)
        self.emit_properties_changed(values)


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
    "DmName": "s",
    "DmUuid": "s",
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
        "DmName": record.backing.names.dm_name,
        "DmUuid": record.backing.names.dm_uuid,
        "Mode": record.mode,
        "State": record.state,
        "Since": record.since_us,
    }


def export_variants(record: ExportRecord) -> dict[str, Variant]:
    return {k: Variant(EXPORT_SIGNATURES[k], v) for k, v in export_values(record).items()}


class ExportInterface(ServiceInterface):
    """org.qubes.BlockBroker1.Export: one export's properties, read live from its ExportRecord;
    Detach is dispatched by policyd.bus.service."""

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
    def DmName(self) -> DBusStr:
        return self.record.backing.names.dm_name

    @dbus_property(access=PropertyAccess.READ)
    def DmUuid(self) -> DBusStr:
        return self.record.backing.names.dm_uuid

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return self.record.mode

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.record.state

    @dbus_property(access=PropertyAccess.READ)
    def Since(self) -> DBusUInt64:
        return self.record.since_us


REQUEST_SIGNATURES = {
    "Id": "u",
    "Source": "s",
    "Target": "s",
    "DeviceName": "s",
    "Major": "u",
    "Minor": "u",
    "Diskseq": "t",
    "Size": "t",
    "Mode": "s",
    "DeviceReadOnly": "b",
    "Description": "s",
    "Created": "t",
    "Expires": "t",
    "State": "s",
    "Rule": "s",
    "Export": "o",
    "BackendPath": "s",
    "Devid": "u",
    "Error": "s",
}


def request_values(req: PendingRequest) -> dict[str, Any]:
    dev = req.device
    return {
        "Id": req.number,
        "Source": req.source,
        "Target": req.target,
        "DeviceName": dev.name,
        "Major": dev.major,
        "Minor": dev.minor,
        "Diskseq": dev.diskseq,
        "Size": dev.size,
        "Mode": req.mode,
        "DeviceReadOnly": dev.read_only,
        "Description": dev.description,
        "Created": req.created_us,
        "Expires": req.expires_us,
        "State": req.state,
        "Rule": req.location,
        "Export": req.export,
        "BackendPath": req.backend_path,
        "Devid": req.devid,
        "Error": req.error,
    }


def request_variants(req: PendingRequest) -> dict[str, Variant]:
    return {k: Variant(REQUEST_SIGNATURES[k], v) for k, v in request_values(req).items()}


class RequestInterface(ServiceInterface):
    """org.qubes.BlockBroker1.Request; methods are dispatched by policyd.bus.service."""

    def __init__(self, req: PendingRequest) -> None:
        super().__init__(REQUEST_IFACE)
        self.req = req

    @dbus_method()
    def Approve(self) -> None:
        not_dispatched()

    @dbus_method()
    def Deny(self) -> None:
        not_dispatched()

    @dbus_method()
    def Withdraw(self) -> None:
        not_dispatched()

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusUInt32:
        return self.req.number

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> DBusStr:
        return self.req.source

    @dbus_property(access=PropertyAccess.READ)
    def Target(self) -> DBusStr:
        return self.req.target

    @dbus_property(access=PropertyAccess.READ)
    def DeviceName(self) -> DBusStr:
        return self.req.device.name

    @dbus_property(access=PropertyAccess.READ)
    def Major(self) -> DBusUInt32:
        return self.req.device.major

    @dbus_property(access=PropertyAccess.READ)
    def Minor(self) -> DBusUInt32:
        return self.req.device.minor

    @dbus_property(access=PropertyAccess.READ)
    def Diskseq(self) -> DBusUInt64:
        return self.req.device.diskseq

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> DBusUInt64:
        return self.req.device.size

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return self.req.mode

    @dbus_property(access=PropertyAccess.READ)
    def DeviceReadOnly(self) -> DBusBool:
        return self.req.device.read_only

    @dbus_property(access=PropertyAccess.READ)
    def Description(self) -> DBusStr:
        return self.req.device.description

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusUInt64:
        return self.req.created_us

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> DBusUInt64:
        return self.req.expires_us

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.req.state

    @dbus_property(access=PropertyAccess.READ)
    def Rule(self) -> DBusStr:
        return self.req.location

    @dbus_property(access=PropertyAccess.READ)
    def Export(self) -> DBusObjectPath:
        return self.req.export

    @dbus_property(access=PropertyAccess.READ)
    def BackendPath(self) -> DBusStr:
        return self.req.backend_path

    @dbus_property(access=PropertyAccess.READ)
    def Devid(self) -> DBusUInt32:
        return self.req.devid

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> DBusStr:
        return self.req.error
