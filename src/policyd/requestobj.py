"""The D-Bus face of a VM's export request: the pending request and its Request object.

Unprivileged policyd code; no I/O. Everything shown here was validated (policyd.vmdevice) before
a request was created; `Description` is still the VM's own text, which clients show as untrusted.
The methods declared here only define introspection data (dbus/org.qubes.BlockBroker1.Request.xml);
policyd.service dispatches the calls. No `from __future__ import annotations`: dbus-fast reads
the annotations at import time.
"""

import asyncio
from dataclasses import dataclass
from typing import Any, NoReturn

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusBool, DBusObjectPath, DBusStr, DBusUInt32, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from policyd import errors
from policyd.vmdevice import DeviceDescriptor

REQUEST_IFACE = "org.qubes.BlockBroker1.Request"
REQUEST_PATH_PREFIX = "/org/qubes/BlockBroker1/request/"

STATE_PENDING = "pending"
STATE_APPROVING = "approving"
STATE_APPROVED = "approved"
STATE_DENIED = "denied"
STATE_EXPIRED = "expired"
STATE_WITHDRAWN = "withdrawn"
STATE_FAILED = "failed"


@dataclass(eq=False)
class PendingRequest:
    number: int
    source: str
    source_domid: int
    target: str
    target_domid: int
    device: DeviceDescriptor
    mode: str  # "r" | "w"
    created_us: int
    expires_us: int
    requester: str  # the bridge connection's unique bus name
    location: str  # the policy rule that said "ask"
    state: str = STATE_PENDING
    export: str = "/"  # the Export object, once approved
    backend_path: str = ""
    devid: int = 0
    error: str = ""  # the error name when State is failed (e.g. DeviceChanged)
    timer: asyncio.TimerHandle | None = None

    @property
    def object_path(self) -> str:
        return f"{REQUEST_PATH_PREFIX}{self.number}"

    @property
    def policy_mode(self) -> str:
        return "rw" if self.mode == "w" else "ro"


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


def not_dispatched() -> NoReturn:
    raise errors.Internal("method call was not dispatched")


class RequestInterface(ServiceInterface):
    """org.qubes.BlockBroker1.Request; methods are dispatched by policyd.service."""

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
