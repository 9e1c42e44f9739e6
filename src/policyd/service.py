"""The D-Bus service: dispatches method calls, authorizes callers, publishes export objects.

Unprivileged policyd code; input from the bus is validated here (arguments through
policyd.validate) before policyd.exporter acts on it. Every method call on the Manager and
Export interfaces goes through one message handler, because authorization needs the caller's
unique name (msg.sender), which dbus-fast's decorated methods do not expose. Routing is data
(ROUTES); policyd.authz checks at start-up that every declared method is routed and has an
authorization entry. Received fds are owned here: each is either handed to the exporter or
closed when the call ends, whatever the message was.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from policyd import audit, authz, errors, logfmt, validate
from policyd.audit import PolicyGate
from policyd.brokerclient import AsyncBrokerClient
from policyd.bus import PolicydBus
from policyd.exporter import Exporter
from policyd.interfaces import (
    EXPORT_IFACE,
    EXPORT_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    ExportInterface,
    ManagerInterface,
    ManagerState,
    export_values,
)
from policyd.policy import TagProvider, no_tags
from policyd.registry import ExportRecord
from policyd.requests import (
    DEFAULT_EXPIRY_S,
    REQUEST_IFACE,
    REQUEST_PATH_PREFIX,
    PendingRequest,
    RequestInterface,
    Requests,
    request_values,
)
from policyd.xenstore import XenStore

EXPORT_PATH_RE = re.compile(re.escape(EXPORT_PATH_PREFIX) + r"([1-9][0-9]{0,9})")


class ReceivedFds:
    """The fds that came with one message; whatever is not taken is closed at the end."""

    def __init__(self, fds: list[int]) -> None:
        self._fds: list[int | None] = list(fds)

    def take(self, untrusted_index: object) -> int:
        if (
            not isinstance(untrusted_index, int)
            or not 0 <= untrusted_index < len(self._fds)
            or self._fds[untrusted_index] is None
        ):
            raise errors.InvalidArgument(
                "the fd did not arrive with the call; the client must negotiate unix fd "
                "passing (dbus-fast: negotiate_unix_fd=True)"
            )
        fd = self._fds[untrusted_index]
        self._fds[untrusted_index] = None
        assert fd is not None
        return fd

    def close_rest(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = []


Handler = Callable[[list[Any], ReceivedFds], Awaitable[list[Any]]]


@dataclass(frozen=True)
class Route:
    in_signature: str
    out_signature: str
    handler: Handler


class Service:
    def __init__(
        self,
        bus: MessageBus,
        *,
        version: str,
        broker: AsyncBrokerClient,
        xenstore: XenStore,
        backend_domid: int,
        sysfs_root: str,
        policy_dir: str = "/etc/blockbroker/policy.d",
        tags: TagProvider = no_tags,
        request_expiry_s: int = DEFAULT_EXPIRY_S,
    ) -> None:
        self.bus = bus
        self.state = ManagerState(version)
        self.manager = ManagerInterface(self.state)
        self.exporter = Exporter(
            broker, xenstore, backend_domid=backend_domid, sysfs_root=sysfs_root, listener=self
        )
        self._objects: dict[int, ExportInterface] = {}
        self.gate = PolicyGate(
            policy_dir,
            lambda domid: self.exporter.xenstore_call(self.exporter.xenstore.domain_name, domid),
            tags,
        )
        self.exporter.policy_check = self.gate.check_path
        self.requests = Requests(self.exporter, self.gate, self, request_expiry_s)
        self._request_objects: dict[int, RequestInterface] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.callers = authz.CallerCache()
        self.routes: dict[tuple[str, str], Route] = {
            (MANAGER_IFACE, "Attach"): Route("s", "o", self._attach),
            (MANAGER_IFACE, "Detach"): Route("s", "", self._detach_backend),
            (MANAGER_IFACE, "Export"): Route("ssa{sv}", "o", self._export),
            (MANAGER_IFACE, "ExportFd"): Route("hsa{sv}", "o", self._export_fd),
            (MANAGER_IFACE, "DetachExport"): Route("o", "", self._detach_export),
            (EXPORT_IFACE, "Detach"): Route("", "", self._detach_self),
            (MANAGER_IFACE, "RequestExport"): Route("sa{sv}sa{sv}", "o", self._request_export),
            (REQUEST_IFACE, "Approve"): Route("", "", self._approve),
            (REQUEST_IFACE, "Deny"): Route("", "", self._deny),
            (REQUEST_IFACE, "Withdraw"): Route("", "", self._withdraw),
        }

    def start(self) -> None:
        """Check the tables, export the manager and take over method dispatch."""
        declared = self._declared_methods()
        authz.check_table(declared)
        unrouted = declared - set(self.routes)
        if unrouted or set(self.routes) - declared:
            raise authz.StartupError(f"routing table does not match the interfaces: {unrouted}")
        self.bus.export(MANAGER_PATH, self.manager)
        self.bus.add_message_handler(self._on_message)
        self.bus.add_message_handler(self._on_name_lost)
        watch = asyncio.get_running_loop().create_task(self._watch_requesters())
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)

    def _declared_methods(self) -> set[tuple[str, str]]:
        probe = ExportInterface.__new__(ExportInterface)
        ServiceInterface.__init__(probe, EXPORT_IFACE)
        request_probe = RequestInterface.__new__(RequestInterface)
        ServiceInterface.__init__(request_probe, REQUEST_IFACE)
        declared = set()
        for iface in (self.manager, probe, request_probe):
            for method in iface.introspect().methods:
                declared.add((iface.name, method.name))
        return declared

    # -- dispatch -------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL:
            ReceivedFds(msg.unix_fds).close_rest()
            return False
        key = self._route_key(msg)
        if key is None:
            ReceivedFds(msg.unix_fds).close_rest()  # nothing else takes fds
            return False
        task = asyncio.get_running_loop().create_task(self._run(msg, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _route_key(self, msg: Message) -> tuple[str, str] | None:
        if msg.path == MANAGER_PATH:
            iface = MANAGER_IFACE
        elif msg.path is not None and msg.path.startswith(EXPORT_PATH_PREFIX):
            iface = EXPORT_IFACE
        elif msg.path is not None and msg.path.startswith(REQUEST_PATH_PREFIX):
            iface = REQUEST_IFACE
        else:
            return None
        if msg.interface not in (None, iface):
            return None
        key = (iface, msg.member)
        return key if key in self.routes else None

    async def _run(self, msg: Message, key: tuple[str, str]) -> None:
        """Handle one call; the signals it causes are sent after its reply (PolicydBus)."""
        if not isinstance(self.bus, PolicydBus):
            await self._call(msg, key)
            return
        self.bus.hold_signals()
        try:
            await self._call(msg, key)
        finally:
            self.bus.send_held()

    async def _call(self, msg: Message, key: tuple[str, str]) -> None:
        fds = ReceivedFds(msg.unix_fds)
        route = self.routes[key]
        uid: int | None = None
        try:
            details = self.requests.polkit_details(msg.path) if key[0] == REQUEST_IFACE else None
            uid = await authz.authorize(
                self.bus, msg.sender, *key, details=details, cache=self.callers
            )
            audit.CALLER.set(audit.Caller(uid, msg.sender or ""))
            if msg.signature != route.in_signature:
                raise errors.InvalidArgument(
                    f"{key[1]} takes ({route.in_signature}), not ({msg.signature})"
                )
            body = await route.handler([msg.path, *msg.body], fds)
            reply = Message.new_method_return(msg, route.out_signature, body)
        except errors.PolicydError as e:
            logfmt.info("call refused", method=key[1], uid=uid, error=e.name, detail=e.text)
            reply = Message.new_error(msg, e.dbus_name, e.text)
        except Exception:
            logfmt.error("call failed", method=key[1], uid=uid, exc=True)
            reply = Message.new_error(
                msg, errors.Internal().dbus_name, "internal error in policyd; see its log"
            )
        finally:
            fds.close_rest()
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    # -- handlers: args = [object path, *body] --------------------------------------------------

    async def _attach(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        record = await self.exporter.attach(args[1])
        return [record.object_path]

    async def _detach_backend(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.exporter.detach_backend(args[1])
        return []

    async def _export(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        path = validate.source_path(args[1])
        frontend = validate.domain_name(args[2])
        opts = validate.export_options(args[3])
        record = await self.exporter.export_path(path, frontend, opts)
        return [record.object_path]

    async def _export_fd(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        frontend = validate.domain_name(args[2])
        opts = validate.export_options(args[3])
        fd = fds.take(args[1])
        record = await self.exporter.export_fd(fd, frontend, opts)
        return [record.object_path]

    async def _detach_export(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.exporter.detach(self._record_at(args[1]))
        return []

    async def _detach_self(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.exporter.detach(self._record_at(args[0]))
        return []

    async def _request_export(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        path = await self.requests.request_export(args[1], args[2], args[3], args[4])
        # A requester that disconnected while the request was being made missed the
        # NameOwnerChanged watch: withdraw its request now rather than at expiry.
        caller = audit.CALLER.get()
        if caller is not None and not await self._has_owner(caller.bus_name):
            self.requests.requester_gone(caller.bus_name)
        return [path]

    async def _has_owner(self, name: str) -> bool:
        reply = await authz.bus_daemon_call(self.bus, "NameHasOwner", name)
        return (
            reply is None
            or reply.message_type is not MessageType.METHOD_RETURN
            or (reply.body == [True])
        )

    async def _approve(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.requests.approve(args[0])
        return []

    async def _deny(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.requests.deny(args[0])
        return []

    async def _withdraw(self, args: list[Any], fds: ReceivedFds) -> list[Any]:
        await self.requests.withdraw(args[0])
        return []

    def _record_at(self, untrusted_path: object) -> ExportRecord:
        m = EXPORT_PATH_RE.fullmatch(untrusted_path) if isinstance(untrusted_path, str) else None
        record = self.exporter.registry.get(int(m[1])) if m else None
        if record is None:
            raise errors.NotFound(f"no export at {untrusted_path!s:.200}")
        return record

    # -- exporter.Listener ------------------------------------------------------------------------

    def export_added(self, record: ExportRecord) -> None:
        iface = ExportInterface(record)
        self._objects[record.number] = iface
        self.bus.export(record.object_path, iface)

    def export_removed(self, record: ExportRecord) -> None:
        if self._objects.pop(record.number, None) is not None:
            self.bus.unexport(record.object_path)

    def export_changed(self, record: ExportRecord, names: list[str]) -> None:
        iface = self._objects.get(record.number)
        if iface is not None:
            values = export_values(record)
            iface.emit_properties_changed({name: values[name] for name in names})

    def manager_changed(self, names: list[str]) -> None:
        self.state.export_count = len(self.exporter.registry)
        self.state.broker_connected = self.exporter.broker_connected
        self.state.xenstore_connected = self.exporter.xenstore.connected
        self.manager.emit_properties_changed(self.manager.values(names))

    # -- requests.Listener ------------------------------------------------------------------------

    def request_added(self, req: PendingRequest) -> None:
        iface = RequestInterface(req)
        self._request_objects[req.number] = iface
        self.bus.export(req.object_path, iface)

    def request_changed(self, req: PendingRequest, names: list[str]) -> None:
        iface = self._request_objects.get(req.number)
        if iface is not None:
            values = request_values(req)
            iface.emit_properties_changed({name: values[name] for name in names})

    def request_removed(self, req: PendingRequest) -> None:
        if self._request_objects.pop(req.number, None) is not None:
            self.bus.unexport(req.object_path)

    async def _watch_requesters(self) -> None:
        """A bridge that disconnects (its VM's qrexec call ended) withdraws its requests."""
        await authz.bus_daemon_call(
            self.bus,
            "AddMatch",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'",
        )

    def _on_name_lost(self, msg: Message) -> bool:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.sender == "org.freedesktop.DBus"
            and msg.member == "NameOwnerChanged"
            and msg.signature == "sss"
            and msg.body[0].startswith(":")
            and msg.body[2] == ""
        ):
            self.callers.forget(msg.body[0])
            self.requests.requester_gone(msg.body[0])
        return False
