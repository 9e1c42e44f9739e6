"""The D-Bus service: one table of methods, dispatch, authorization, received fds.

Unprivileged policyd code; input from the bus is validated here (arguments through
policyd.validate) before policyd.exports and policyd.requests act on it. Every method call on
the Manager, Export and Request interfaces goes through one message handler, because
authorization needs the caller's unique name (msg.sender), which dbus-fast's decorated methods
do not expose. METHODS is the whole D-Bus surface, one row per method (signature, access rule,
polkit action, handler, and the polkit details of the object the call concerns: what an
authentication prompt shows, policyd.bus.prompts), as the broker's DISPATCH is its protocol;
the service refuses to start if it does not match the interfaces' declarations. Received fds
are owned here: each is either handed to the exporter or closed when the call ends, whatever
the message was. The block script's direct path (policyd.bus.blocksocket) runs Attach and
Detach through the same rows and the same `perform` (authorization, audit caller, handler,
named errors); only the caller's identity comes from SO_PEERCRED instead of the bus daemon.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from policyd import audit, claims, errors, logfmt, validate
from policyd.bus import authz, prompts
from policyd.bus.authz import (
    POLKIT_APPROVE,
    POLKIT_ATTACH,
    POLKIT_DETACH,
    POLKIT_EXPORT,
    POLKIT_REQUEST_EXPORT,
    Access,
)
from policyd.bus.connection import PolicydBus
from policyd.bus.interfaces import ExportInterface, ManagerInterface, RequestInterface
from policyd.bus.prompts import PATH_SHOWN
from policyd.exports.exporter import Exporter
from policyd.exports.registry import ExportRecord
from policyd.names import (
    EXPORT_IFACE,
    EXPORT_PATH_PREFIX,
    EXPORT_PATH_RE,
    MANAGER_IFACE,
    MANAGER_PATH,
    REQUEST_IFACE,
    REQUEST_PATH_PREFIX,
    number_in,
)
from policyd.requests.lifecycle import Requests


class StartupError(Exception):
    """policyd refuses to start: the message says what is misconfigured."""


class ReceivedFds:
    """The fds that came with one message; whatever is not taken is closed at the end."""

    def __init__(self, fds: list[int]) -> None:
        self._fds: list[int | None] = list(fds)

    def take(self, untrusted_index: object) -> int:
        fd = self.peek(untrusted_index)
        assert isinstance(untrusted_index, int)  # peek checked it
        self._fds[untrusted_index] = None
        return fd

    def peek(self, untrusted_index: object) -> int:
        """The fd at the index, still owned here."""
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
        assert fd is not None
        return fd

    def close_rest(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = []


class Service:
    """Dispatches every method call of policyd's interfaces through METHODS: authorize the
    caller, check the signature, run the handler, reply (or a named error), close stray fds."""

    def __init__(self, bus: MessageBus, *, exporter: Exporter, requests: Requests) -> None:
        self.bus = bus
        self.exporter = exporter
        self.requests = requests
        self.callers = authz.CallerCache()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Check the table against the interfaces and take over method dispatch."""
        check_table(declared_methods())
        self.bus.add_message_handler(self._on_message)
        self.bus.add_message_handler(self._on_name_lost)
        watch = asyncio.get_running_loop().create_task(self._watch_requesters())
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)

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
        return key if key in ROUTES else None

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
        route = ROUTES[key]
        args = [msg.path, *msg.body]

        async def authorize() -> Authorized:
            # What polkit's prompt shows (and its rules see). A call whose object cannot be
            # described (wrong signature, invalid arguments, no such object) is not worth a
            # prompt: authz asks polkit without interaction; if it passes, the error stands.
            details: dict[str, str] | None = None
            undescribed: errors.PolicydError | None = None
            if msg.signature != route.in_signature:
                undescribed = errors.InvalidArgument(
                    f"{key[1]} takes ({route.in_signature}), not ({msg.signature})"
                )
            elif route.details is not None:
                try:
                    details = route.details(self, args, fds)
                except errors.PolicydError as e:
                    undescribed = e
            uid = await authz.authorize(
                self.bus,
                msg.sender,
                route.name,
                route.access,
                route.action,
                details=details,
                cache=self.callers,
                undescribed=undescribed,
            )
            return Authorized(audit.Caller(uid, msg.sender or ""), undescribed)

        result = await self.perform(route, authorize, args, fds)
        if isinstance(result, errors.PolicydError):
            reply = Message.new_error(msg, result.dbus_name, result.text)
        else:
            reply = Message.new_method_return(msg, route.out_signature, result)
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def perform(
        self,
        route: Method,
        authorize: Callable[[], Awaitable[Authorized]],
        args: list[Any],
        fds: ReceivedFds,
    ) -> list[Any] | errors.PolicydError:
        """One call, whatever its transport (D-Bus above, the block socket in block_call):
        the transport's `authorize` establishes the caller or raises AccessDenied; the handler
        runs as that caller (audit.CALLER). Returns the reply's body, or the named error to
        answer (logged here; anything unexpected is logged and answered as Error.Internal,
        without a traceback). The fds are closed at the end unless the handler took them."""
        caller: audit.Caller | None = None
        try:
            authorized = await authorize()
            caller = authorized.caller
            audit.CALLER.set(caller)
            if authorized.refusal is not None:
                raise authorized.refusal
            return await route.handler(self, args, fds)
        except errors.PolicydError as e:
            logfmt.info(
                "call refused",
                method=route.name,
                uid=None if caller is None else caller.uid,
                **_peer(caller),
                error=e.name,
                detail=e.text,
            )
            return e
        except Exception:
            logfmt.error(
                "call failed",
                method=route.name,
                uid=None if caller is None else caller.uid,
                **_peer(caller),
                exc=True,
            )
            return errors.Internal("internal error in policyd; see its log")
        finally:
            fds.close_rest()

    async def block_call(
        self,
        member: str,
        untrusted_path: str,
        peer: audit.Caller,
        send_reply: Callable[[list[Any] | errors.PolicydError], None],
    ) -> None:
        """Manager.Attach or Manager.Detach (`member`) for policyd's block socket
        (policyd.bus.blocksocket): exactly the D-Bus method's row of METHODS (its access rule,
        handler, audit and errors), with the caller's uid and pid from SO_PEERCRED (`peer`)
        instead of the bus daemon. `send_reply` gets the outcome before the signals the call
        caused go out on the bus."""
        route = ROUTES[(MANAGER_IFACE, member)]
        if route.access is not Access.ROOT or route.in_signature != "s":
            raise AssertionError(f"{member} is not a block-socket method")

        async def authorize() -> Authorized:
            authz.require_root(peer.uid, route.name, route.action)
            return Authorized(peer)

        bus = self.bus if isinstance(self.bus, PolicydBus) else None
        if bus is not None:
            bus.hold_signals()
        try:
            args = [MANAGER_PATH, untrusted_path]
            send_reply(await self.perform(route, authorize, args, ReceivedFds([])))
        finally:
            if bus is not None:
                bus.send_held()

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

    # -- polkit details (policyd.bus.prompts): the same validation as the handler's ------------

    def _export_details(self, args: list[Any], fds: ReceivedFds) -> dict[str, str]:
        path = validate.source_path(args[1])
        frontend = validate.domain_name(args[2])
        opts = validate.export_options(args[3])
        size = self.exporter.sources.preview_path(path)
        return prompts.export(claims.shown(path, PATH_SHOWN), size, frontend, opts.read_only)

    def _export_fd_details(self, args: list[Any], fds: ReceivedFds) -> dict[str, str]:
        frontend = validate.domain_name(args[2])
        opts = validate.export_options(args[3])
        node, size = self.exporter.sources.preview_fd(fds.peek(args[1]))
        shown = "the caller's open device " + claims.shown(node, PATH_SHOWN)
        return prompts.export(shown, size, frontend, opts.read_only)

    def _detach_export_details(self, args: list[Any], fds: ReceivedFds) -> dict[str, str]:
        return prompts.detach(self._record_at(args[1]))

    def _detach_self_details(self, args: list[Any], fds: ReceivedFds) -> dict[str, str]:
        return prompts.detach(self._record_at(args[0]))

    def _request_details(self, args: list[Any], fds: ReceivedFds) -> dict[str, str]:
        return prompts.request(self.requests.lookup(args[0]))

    def _record_at(self, untrusted_path: object) -> ExportRecord:
        number = number_in(EXPORT_PATH_RE, untrusted_path)
        record = None if number is None else self.exporter.registry.get(number)
        if record is None:
            raise errors.NotFound(f"no export at {untrusted_path!s:.200}")
        return record

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


@dataclass(frozen=True)
class Authorized:
    """What a transport's authorization established: who calls, and the error the call ends
    in after all, if it is already known (D-Bus: its object could not be described)."""

    caller: audit.Caller
    refusal: errors.PolicydError | None = None


def _peer(caller: audit.Caller | None) -> dict[str, object]:
    """The log fields naming a block-socket caller (a D-Bus caller is logged by uid only)."""
    if caller is None or caller.pid is None:
        return {}
    return {"pid": caller.pid, "via": "block-socket"}


Handler = Callable[[Service, list[Any], ReceivedFds], Awaitable[list[Any]]]
Details = Callable[[Service, list[Any], ReceivedFds], dict[str, str]]


@dataclass(frozen=True)
class Method:
    """One D-Bus method: its signature, who may call it, and the Service method that runs it."""

    interface: str
    name: str
    in_signature: str
    out_signature: str
    access: Access
    action: str  # the polkit action asked (or named in the refusal, for Access.ROOT)
    handler: Handler
    details: Details | None = None  # the object the call concerns, for polkit (prompts)


M, E, R = MANAGER_IFACE, EXPORT_IFACE, REQUEST_IFACE
S = Service
METHODS: tuple[Method, ...] = (
    Method(M, "Attach", "s", "o", Access.ROOT, POLKIT_ATTACH, S._attach),
    Method(M, "Detach", "s", "", Access.ROOT, POLKIT_ATTACH, S._detach_backend),
    Method(
        M,
        "Export",
        "ssa{sv}",
        "o",
        Access.ROOT_OR_POLKIT,
        POLKIT_EXPORT,
        S._export,
        S._export_details,
    ),
    Method(
        M,
        "ExportFd",
        "hsa{sv}",
        "o",
        Access.ROOT_OR_POLKIT,
        POLKIT_EXPORT,
        S._export_fd,
        S._export_fd_details,
    ),
    Method(
        M,
        "DetachExport",
        "o",
        "",
        Access.ROOT_OR_POLKIT,
        POLKIT_DETACH,
        S._detach_export,
        S._detach_export_details,
    ),
    Method(
        E,
        "Detach",
        "",
        "",
        Access.ROOT_OR_POLKIT,
        POLKIT_DETACH,
        S._detach_self,
        S._detach_self_details,
    ),
    Method(
        M,
        "RequestExport",
        "sa{sv}sa{sv}",
        "o",
        Access.BRIDGE_OR_POLKIT,
        POLKIT_REQUEST_EXPORT,
        S._request_export,
    ),
    Method(R, "Approve", "", "", Access.POLKIT, POLKIT_APPROVE, S._approve, S._request_details),
    Method(R, "Deny", "", "", Access.POLKIT, POLKIT_APPROVE, S._deny, S._request_details),
    Method(
        R,
        "Withdraw",
        "",
        "",
        Access.BRIDGE_OR_POLKIT,
        POLKIT_REQUEST_EXPORT,
        S._withdraw,
        S._request_details,
    ),
)
del M, E, R, S
ROUTES: dict[tuple[str, str], Method] = {(m.interface, m.name): m for m in METHODS}


def declared_methods() -> set[tuple[str, str]]:
    """(interface, method) of every method the interfaces declare (their introspection)."""
    probes: list[ServiceInterface] = []
    for cls, name in (
        (ManagerInterface, MANAGER_IFACE),
        (ExportInterface, EXPORT_IFACE),
        (RequestInterface, REQUEST_IFACE),
    ):
        probe = cls.__new__(cls)
        ServiceInterface.__init__(probe, name)
        probes.append(probe)
    return {(p.name, method.name) for p in probes for method in p.introspect().methods}


def check_table(declared: set[tuple[str, str]]) -> None:
    """Every declared method has its row in METHODS, and every row a declared method."""
    missing = declared - set(ROUTES)
    if missing:
        raise StartupError(f"methods without a polkit action or read-only entry: {sorted(missing)}")
    stale = set(ROUTES) - declared
    if stale:
        raise StartupError(f"polkit table names methods that do not exist: {sorted(stale)}")
