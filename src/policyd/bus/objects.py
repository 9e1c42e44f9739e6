"""The objects policyd shows on the bus: the Manager, one per export, one per pending request.

Unprivileged policyd code. The export and request layers tell this publisher what changed
(policyd.exports.exporter.Listener, policyd.requests.lifecycle.Listener); it exports and
unexports the objects and emits their PropertiesChanged signals. It holds no state of its own
beyond the interface objects.
"""

from __future__ import annotations

from dbus_fast.aio import MessageBus

from policyd.bus.interfaces import (
    ExportInterface,
    ManagerInterface,
    RequestInterface,
    export_values,
    request_values,
)
from policyd.exports.registry import ExportRecord
from policyd.names import MANAGER_PATH
from policyd.requests.model import PendingRequest


class BusObjects:
    """Publishes the Manager at start(), and export and request objects as they come and go."""

    def __init__(self, bus: MessageBus, version: str) -> None:
        self.bus = bus
        self.manager = ManagerInterface(version)
        self._exports: dict[int, ExportInterface] = {}
        self._requests: dict[int, RequestInterface] = {}

    def start(self) -> None:
        self.bus.export(MANAGER_PATH, self.manager)

    # -- the Manager's properties ------------------------------------------------------------

    def export_count_changed(self, count: int) -> None:
        self.manager.update(ExportCount=count)

    def broker_connected(self, connected: bool) -> None:
        self.manager.update(BrokerConnected=connected)

    def xenstore_connected(self, connected: bool) -> None:
        self.manager.update(XenStoreConnected=connected)

    # -- exports (policyd.exports.exporter.Listener) -------------------------------------------

    def export_added(self, record: ExportRecord) -> None:
        iface = ExportInterface(record)
        self._exports[record.number] = iface
        self.bus.export(record.object_path, iface)

    def export_removed(self, record: ExportRecord) -> None:
        if self._exports.pop(record.number, None) is not None:
            self.bus.unexport(record.object_path)

    def export_changed(self, record: ExportRecord, names: list[str]) -> None:
        iface = self._exports.get(record.number)
        if iface is not None:
            values = export_values(record)
            iface.emit_properties_changed({name: values[name] for name in names})

    # -- requests (policyd.requests.lifecycle.Listener) ----------------------------------------

    def request_added(self, req: PendingRequest) -> None:
        iface = RequestInterface(req)
        self._requests[req.number] = iface
        self.bus.export(req.object_path, iface)

    def request_changed(self, req: PendingRequest, names: list[str]) -> None:
        iface = self._requests.get(req.number)
        if iface is not None:
            values = request_values(req)
            iface.emit_properties_changed({name: values[name] for name in names})

    def request_removed(self, req: PendingRequest) -> None:
        if self._requests.pop(req.number, None) is not None:
            self.bus.unexport(req.object_path)
