"""Plain data the client hands to callers: exports, service status, change events.

Runs in the calling user's process; no I/O here. Values come from policyd's D-Bus properties
(trusted service, but parsed defensively: a missing property gets a neutral default, so an older
or newer policyd does not break listing). Field names are the snake_case of the D-Bus property
names; `to_json` gives the CLI's --json object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# The bus contract, the client's one copy of it (the VM-side tools must not import policyd):
# tests/client/test_contract.py pins it to policyd.names.
BUS_NAME: Final = "org.qubes.BlockBroker1"
MANAGER_PATH: Final = "/org/qubes/BlockBroker1"
MANAGER_IFACE: Final = BUS_NAME + ".Manager"
EXPORT_IFACE: Final = BUS_NAME + ".Export"
EXPORT_PATH_PREFIX: Final = MANAGER_PATH + "/export/"
REQUEST_IFACE: Final = BUS_NAME + ".Request"
REQUEST_PATH_PREFIX: Final = MANAGER_PATH + "/request/"
ERROR_PREFIX: Final = BUS_NAME + ".Error."


def _get(props: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = props.get(key, default)
    return value if isinstance(value, kind) else default


@dataclass(frozen=True)
class ExportInfo:
    """One export: a loop device (or block device) given to a frontend domain."""

    export: str  # object path /org/qubes/BlockBroker1/export/<n>
    source: str = ""
    source_kind: str = ""
    backend_domain: str = ""
    backend_domid: int = 0
    frontend_domain: str = ""
    frontend_domid: int = 0
    devid: int = 0
    backend_path: str = ""
    loop_device: str = ""
    major: int = 0
    minor: int = 0
    diskseq: int = 0
    dm_name: str = ""  # a device-mapper device's name and uuid (LVM: VG-LV, LVM-<uuids>)
    dm_uuid: str = ""
    mode: str = ""
    state: str = ""
    since: int = 0  # unix microseconds

    @property
    def id(self) -> str:
        """The short id (the last element of the object path), accepted by `blockbroker detach`."""
        return self.export.rsplit("/", 1)[-1]

    @classmethod
    def from_properties(cls, export: str, props: Mapping[str, Any]) -> ExportInfo:
        return cls(
            export=export,
            source=_get(props, "Source", str, ""),
            source_kind=_get(props, "SourceKind", str, ""),
            backend_domain=_get(props, "BackendDomain", str, ""),
            backend_domid=_get(props, "BackendDomid", int, 0),
            frontend_domain=_get(props, "FrontendDomain", str, ""),
            frontend_domid=_get(props, "FrontendDomid", int, 0),
            devid=_get(props, "Devid", int, 0),
            backend_path=_get(props, "BackendPath", str, ""),
            loop_device=_get(props, "LoopDevice", str, ""),
            major=_get(props, "Major", int, 0),
            minor=_get(props, "Minor", int, 0),
            diskseq=_get(props, "Diskseq", int, 0),
            dm_name=_get(props, "DmName", str, ""),
            dm_uuid=_get(props, "DmUuid", str, ""),
            mode=_get(props, "Mode", str, ""),
            state=_get(props, "State", str, ""),
            since=_get(props, "Since", int, 0),
        )

    def updated(self, changed: Mapping[str, Any]) -> ExportInfo:
        """A copy with the changed D-Bus properties applied (from PropertiesChanged)."""
        merged = {**self.to_properties(), **changed}
        return ExportInfo.from_properties(self.export, merged)

    def to_properties(self) -> dict[str, Any]:
        return {
            _PROPERTY_NAMES[f.name]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "export"
        }

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **dataclasses.asdict(self)}


_PROPERTY_NAMES: Final = {
    "source": "Source",
    "source_kind": "SourceKind",
    "backend_domain": "BackendDomain",
    "backend_domid": "BackendDomid",
    "frontend_domain": "FrontendDomain",
    "frontend_domid": "FrontendDomid",
    "devid": "Devid",
    "backend_path": "BackendPath",
    "loop_device": "LoopDevice",
    "major": "Major",
    "minor": "Minor",
    "diskseq": "Diskseq",
    "dm_name": "DmName",
    "dm_uuid": "DmUuid",
    "mode": "Mode",
    "state": "State",
    "since": "Since",
}


@dataclass(frozen=True)
class Status:
    """The service's Manager properties."""

    version: str = ""
    export_count: int = 0
    broker_connected: bool = False
    xenstore_connected: bool = False

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> Status:
        return cls(
            version=_get(props, "Version", str, ""),
            export_count=_get(props, "ExportCount", int, 0),
            broker_connected=_get(props, "BrokerConnected", bool, False),
            xenstore_connected=_get(props, "XenStoreConnected", bool, False),
        )

    def updated(self, changed: Mapping[str, Any]) -> Status:
        current = {
            "Version": self.version,
            "ExportCount": self.export_count,
            "BrokerConnected": self.broker_connected,
            "XenStoreConnected": self.xenstore_connected,
        }
        return Status.from_properties({**current, **changed})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def diskseq_text(diskseq: int) -> str:
    """A diskseq as people see it (CLI tables, the desktop tool, polkit prompts): 0x2a.
    Hex, like the backend's XenStore `diskseq` node; JSON output keeps the number."""
    return f"{diskseq:#x}"


def printable(untrusted: str, limit: int = 64) -> str:
    """VM-supplied text made safe for a terminal: printable ASCII only, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in untrusted[:limit])


@dataclass(frozen=True)
class RequestInfo:
    """A VM's request to export one of its own devices, waiting for a person (or decided).

    `description` and `device_name` come from the VM: untrusted text, shown via `printable`.
    """

    request: str  # object path /org/qubes/BlockBroker1/request/<n>
    number: int = 0
    source: str = ""
    target: str = ""
    device_name: str = ""
    major: int = 0
    minor: int = 0
    diskseq: int = 0
    size: int = 0
    mode: str = ""
    device_read_only: bool = False
    description: str = ""
    created: int = 0  # unix microseconds
    expires: int = 0  # unix microseconds
    state: str = ""
    rule: str = ""
    export: str = ""  # once approved: the Export object it became
    backend_path: str = ""
    devid: int = 0
    error: str = ""  # why it failed, when State is "failed"

    @property
    def id(self) -> str:
        return self.request.rsplit("/", 1)[-1]

    @classmethod
    def from_properties(cls, request: str, props: Mapping[str, Any]) -> RequestInfo:
        return cls(
            request=request,
            number=_get(props, "Id", int, 0),
            source=_get(props, "Source", str, ""),
            target=_get(props, "Target", str, ""),
            device_name=_get(props, "DeviceName", str, ""),
            major=_get(props, "Major", int, 0),
            minor=_get(props, "Minor", int, 0),
            diskseq=_get(props, "Diskseq", int, 0),
            size=_get(props, "Size", int, 0),
            mode=_get(props, "Mode", str, ""),
            device_read_only=_get(props, "DeviceReadOnly", bool, False),
            description=_get(props, "Description", str, ""),
            created=_get(props, "Created", int, 0),
            expires=_get(props, "Expires", int, 0),
            state=_get(props, "State", str, ""),
            rule=_get(props, "Rule", str, ""),
            export=_get(props, "Export", str, ""),
            backend_path=_get(props, "BackendPath", str, ""),
            devid=_get(props, "Devid", int, 0),
            error=_get(props, "Error", str, ""),
        )

    def updated(self, changed: Mapping[str, Any]) -> RequestInfo:
        """A copy with the changed D-Bus properties applied (from PropertiesChanged)."""
        current = {
            _REQUEST_PROPERTY_NAMES[f.name]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "request"
        }
        return RequestInfo.from_properties(self.request, {**current, **changed})

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **dataclasses.asdict(self)}


_REQUEST_PROPERTY_NAMES: Final = {
    "number": "Id",
    "source": "Source",
    "target": "Target",
    "device_name": "DeviceName",
    "major": "Major",
    "minor": "Minor",
    "diskseq": "Diskseq",
    "size": "Size",
    "mode": "Mode",
    "device_read_only": "DeviceReadOnly",
    "description": "Description",
    "created": "Created",
    "expires": "Expires",
    "state": "State",
    "rule": "Rule",
    "export": "Export",
    "backend_path": "BackendPath",
    "devid": "Devid",
    "error": "Error",
}


@dataclass(frozen=True)
class Event:
    """A change seen on the bus.

    kind is "added" (a new export; `export` set), "removed" (`path` gone; `export` is the last
    known state if this client saw it), "changed" (`export` is the new state, `changed` the
    properties that changed), "status" (`status` set), "service" (the service appeared,
    `online` True, or vanished, `online` False), or for export requests "request-added",
    "request-changed", "request-removed" (`request` set, as for exports).
    """

    kind: str
    path: str = ""
    export: ExportInfo | None = None
    changed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    status: Status | None = None
    online: bool | None = None
    request: RequestInfo | None = None
