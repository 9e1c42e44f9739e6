"""Watching policyd without polling: a live view of exports, export requests and status.

Runs as the calling user; listens on the bus. Signals are accepted only from the current owner
of org.qubes.BlockBroker1 (the bus routes by match rule, and this checks the unique sender name
too). Request objects carry VM-supplied text: it stays untrusted in `RequestInfo` and is made
printable only when shown.

Order matters: the match rules go in first, the snapshot (GetManagedObjects, Manager
properties) second, so nothing that happens in between is lost; a signal for an object already
in the snapshot just replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from dbus_fast import Message, MessageType, unpack_variants

from client.errors import BlockBrokerError, ServiceUnavailable
from client.model import (
    BUS_NAME,
    EXPORT_IFACE,
    EXPORT_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    REQUEST_IFACE,
    REQUEST_PATH_PREFIX,
    Event,
    ExportInfo,
    RequestInfo,
    Status,
)

if TYPE_CHECKING:
    from client.api import AsyncClient

PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE: Final = "org.freedesktop.DBus.ObjectManager"

EventCallback = Callable[[Event], None]

MATCH_RULES: Final = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
    f"type='signal',sender='{BUS_NAME}',interface='{OBJECT_MANAGER_IFACE}',path='{MANAGER_PATH}'",
    f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_IFACE}',"
    f"member='PropertiesChanged',path_namespace='{MANAGER_PATH}'",
)


class Subscription:
    """A live view of the service: `exports`, `requests` and `status` stay current while open.

    Created by `AsyncClient.subscribe`; the callback gets one `Event` per change, on the event
    loop. `close()` (or leaving `async with`) removes the match rules.
    """

    def __init__(self, client: AsyncClient, callback: EventCallback) -> None:
        self._client = client
        self._callback = callback
        self._rules: list[str] = []
        self._owner: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.exports: dict[str, ExportInfo] = {}
        self.requests: dict[str, RequestInfo] = {}
        self.status: Status | None = None
        self.closed = False

    async def _start(self) -> None:
        self._client.bus.add_message_handler(self._on_message)
        for rule in MATCH_RULES:
            await self._client._bus_call("AddMatch", "s", [rule])
            self._rules.append(rule)
        try:
            reply = await self._client._bus_call("GetNameOwner", "s", [BUS_NAME])
            self._owner = str(reply[0])
        except ServiceUnavailable:
            self._owner = None
        if self._owner is not None:
            exports, requests = await self._client.managed_objects()
            self.exports = {e.export: e for e in exports}
            self.requests = {r.request: r for r in requests}
            self.status = await self._client.status()

    async def _resync(self, owner: str) -> None:
        """After policyd (re)appears: its current objects, reported as added."""
        try:
            exports, requests = await self._client.managed_objects()
            status = await self._client.status()
        except BlockBrokerError:
            return  # it went away again; NameOwnerChanged tells
        if self.closed or self._owner != owner:
            return
        for info in exports:
            if info.export not in self.exports:  # not already announced by a signal
                self.exports[info.export] = info
                self._emit(Event("added", path=info.export, export=info))
        for req in requests:
            if req.request not in self.requests:
                self.requests[req.request] = req
                self._emit(Event("request-added", path=req.request, request=req))
        self.status = status
        self._emit(Event("status", path=MANAGER_PATH, status=status))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        bus = self._client.bus
        bus.remove_message_handler(self._on_message)
        if bus.connected:
            for rule in self._rules:
                with contextlib.suppress(Exception):
                    await self._client._bus_call("RemoveMatch", "s", [rule])

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _emit(self, event: Event) -> None:
        if not self.closed:
            self._callback(event)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.interface == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged":
            if msg.sender == "org.freedesktop.DBus" and msg.body and msg.body[0] == BUS_NAME:
                self._owner_changed(str(msg.body[2]) or None)
            return
        if self._owner is None or msg.sender != self._owner:
            return  # only the current owner of the service name speaks for it
        if msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesAdded":
            self._added(str(msg.body[0]), unpack_variants(msg.body[1]))
        elif msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesRemoved":
            self._removed(str(msg.body[0]), [str(i) for i in msg.body[1]])
        elif msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged":
            self._changed(msg.path or "", str(msg.body[0]), unpack_variants(msg.body[1]))

    def _owner_changed(self, new_owner: str | None) -> None:
        self._owner = new_owner
        for path, info in sorted(self.exports.items()):
            self._emit(Event("removed", path=path, export=info))
        for path, req in sorted(self.requests.items()):
            self._emit(Event("request-removed", path=path, request=req))
        self.exports.clear()
        self.requests.clear()
        self._emit(Event("service", online=new_owner is not None))
        if new_owner is not None:
            # A restarted policyd may already hold exports (reconciled from XenStore) without
            # announcing them: take a fresh snapshot.
            task = asyncio.get_running_loop().create_task(self._resync(new_owner))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _added(self, path: str, ifaces: dict[str, dict[str, Any]]) -> None:
        if EXPORT_IFACE in ifaces:
            info = ExportInfo.from_properties(path, ifaces[EXPORT_IFACE])
            self.exports[path] = info
            self._emit(Event("added", path=path, export=info))
        if REQUEST_IFACE in ifaces:
            req = RequestInfo.from_properties(path, ifaces[REQUEST_IFACE])
            self.requests[path] = req
            self._emit(Event("request-added", path=path, request=req))

    def _removed(self, path: str, ifaces: list[str]) -> None:
        if EXPORT_IFACE in ifaces:
            self._emit(Event("removed", path=path, export=self.exports.pop(path, None)))
        if REQUEST_IFACE in ifaces:
            gone = self.requests.pop(path, None)
            self._emit(Event("request-removed", path=path, request=gone))

    def _changed(self, path: str, iface: str, changed: dict[str, Any]) -> None:
        if iface == EXPORT_IFACE and path.startswith(EXPORT_PATH_PREFIX):
            old = self.exports.get(path)
            info = old.updated(changed) if old else ExportInfo.from_properties(path, changed)
            self.exports[path] = info
            self._emit(Event("changed", path=path, export=info, changed=changed))
        elif iface == REQUEST_IFACE and path.startswith(REQUEST_PATH_PREFIX):
            old_req = self.requests.get(path)
            req = (
                old_req.updated(changed) if old_req else RequestInfo.from_properties(path, changed)
            )
            self.requests[path] = req
            self._emit(Event("request-changed", path=path, request=req, changed=changed))
        elif iface == MANAGER_IFACE and path == MANAGER_PATH:
            status = self.status.updated(changed) if self.status else None
            status = status or Status.from_properties(changed)
            self.status = status
            self._emit(Event("status", path=path, status=status, changed=changed))
