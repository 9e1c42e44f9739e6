"""The asyncio client for org.qubes.BlockBroker1 (dbus-fast), for GUI tools and the CLI.

Runs as the calling user; talks to policyd over the D-Bus system bus (DBUS_SYSTEM_BUS_ADDRESS is
honoured). It holds no privilege: what a caller may do is decided by the bus policy and policyd.
Every D-Bus error reply becomes the matching exception from `client.errors`.

Calls use plain method-call messages (no introspection round trip). Watching uses match rules on
the service's ObjectManager and PropertiesChanged signals plus NameOwnerChanged, and keeps a
cache, so a GUI gets a snapshot once and then only events: it never has to poll.

    async with await AsyncClient.connect() as bb:
        exp = await bb.export("/var/lib/images/a.img", to="work", read_only=True)
        print(exp.loop_device, exp.diskseq)
        await bb.detach(exp)

`client.sync.Client` wraps this for code without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Final

from dbus_fast import BusType, Message, MessageType, Variant, unpack_variants
from dbus_fast.aio import MessageBus

from client.errors import BlockBrokerError, NotFound, ServiceUnavailable, UsageError, from_dbus
from client.model import (
    BUS_NAME,
    EXPORT_IFACE,
    EXPORT_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    Event,
    ExportInfo,
    Status,
)

PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE: Final = "org.freedesktop.DBus.ObjectManager"
DEFAULT_TIMEOUT: Final = 25.0  # seconds, as libdbus' default method-call timeout
U32_MAX: Final = 0xFFFFFFFF
BACKEND_PATH_PREFIX: Final = "/local/domain/"

EventCallback = Callable[[Event], None]


def export_path(target: str) -> str:
    """The export object path for an object path or a short id ("3")."""
    if target.startswith(EXPORT_PATH_PREFIX):
        return target
    if target.isdigit() and target.isascii():
        return EXPORT_PATH_PREFIX + str(int(target))
    raise UsageError(
        f"{target!r} is not an export: give its object path ({EXPORT_PATH_PREFIX}<n>), its "
        f"short id <n>, or its backend path ({BACKEND_PATH_PREFIX}...)"
    )


def export_options(
    read_only: bool = True, devid: int | None = None, direct_io: bool | None = None
) -> dict[str, Variant]:
    """The a{sv} options of Export/ExportFd; validates devid locally for a clear message."""
    options = {"read-only": Variant("b", bool(read_only))}
    if devid is not None:
        if not 0 <= devid <= U32_MAX:
            raise UsageError(f"devid {devid} is out of range (0..{U32_MAX})")
        options["devid"] = Variant("u", devid)
    if direct_io is not None:
        options["direct-io"] = Variant("b", bool(direct_io))
    return options


class Subscription:
    """A live view of the service: `exports` and `status` stay current while it is open.

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
        self.status: Status | None = None
        self.closed = False

    async def _start(self) -> None:
        bus = self._client.bus
        bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
            f"type='signal',sender='{BUS_NAME}',interface='{OBJECT_MANAGER_IFACE}',"
            f"path='{MANAGER_PATH}'",
            f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_IFACE}',"
            f"member='PropertiesChanged',path_namespace='{MANAGER_PATH}'",
        ):
            await self._client._bus_call("AddMatch", "s", [rule])
            self._rules.append(rule)
        # Match rules first, snapshot second: nothing that happens in between is lost.
        try:
            reply = await self._client._bus_call("GetNameOwner", "s", [BUS_NAME])
            self._owner = str(reply[0])
        except ServiceUnavailable:
            self._owner = None
        if self._owner is not None:
            self.exports = {e.export: e for e in await self._client.list_exports()}
            self.status = await self._client.status()

    async def _resync(self, owner: str) -> None:
        try:
            exports = await self._client.list_exports()
            status = await self._client.status()
        except BlockBrokerError:
            return  # it went away again; NameOwnerChanged tells
        if self.closed or self._owner != owner:
            return
        for info in exports:
            if info.export not in self.exports:  # not already announced by a signal
                self.exports[info.export] = info
                self._emit(Event("added", path=info.export, export=info))
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
                new_owner = str(msg.body[2]) or None
                self._owner = new_owner
                for path, info in sorted(self.exports.items()):
                    self._emit(Event("removed", path=path, export=info))
                self.exports.clear()
                self._emit(Event("service", online=new_owner is not None))
                if new_owner is not None:
                    # A restarted policyd may already hold exports (reconciled from XenStore)
                    # without announcing them: take a fresh snapshot and report it as added.
                    task = asyncio.get_running_loop().create_task(self._resync(new_owner))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            return
        if self._owner is None or msg.sender != self._owner:
            return  # only the current owner of the service name speaks for it
        path = msg.path or ""
        if msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesAdded":
            obj, ifaces = str(msg.body[0]), unpack_variants(msg.body[1])
            if EXPORT_IFACE in ifaces:
                info = ExportInfo.from_properties(obj, ifaces[EXPORT_IFACE])
                self.exports[obj] = info
                self._emit(Event("added", path=obj, export=info))
        elif msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesRemoved":
            obj, ifaces = str(msg.body[0]), list(msg.body[1])
            if EXPORT_IFACE in ifaces:
                gone = self.exports.pop(obj, None)
                self._emit(Event("removed", path=obj, export=gone))
        elif msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged":
            iface, changed = str(msg.body[0]), unpack_variants(msg.body[1])
            if iface == EXPORT_IFACE and path.startswith(EXPORT_PATH_PREFIX):
                old = self.exports.get(path)
                info = old.updated(changed) if old else ExportInfo.from_properties(path, changed)
                self.exports[path] = info
                self._emit(Event("changed", path=path, export=info, changed=changed))
            elif iface == MANAGER_IFACE and path == MANAGER_PATH:
                status = self.status.updated(changed) if self.status else None
                status = status or Status.from_properties(changed)
                self.status = status
                self._emit(Event("status", path=path, status=status, changed=changed))


class AsyncClient:
    """One connection to the system bus, talking to org.qubes.BlockBroker1."""

    def __init__(self, bus: MessageBus, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    @classmethod
    async def connect(
        cls, address: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncClient:
        """Connect to `address`, else $DBUS_SYSTEM_BUS_ADDRESS, else the system bus."""
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or None
        bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        try:
            await asyncio.wait_for(bus.connect(), timeout)
        except (OSError, TimeoutError, ValueError, EOFError) as e:
            where = address or "the system bus"
            raise ServiceUnavailable(f"cannot connect to {where}: {e}") from e
        except Exception as e:  # dbus-fast raises its own AuthError & co.
            raise ServiceUnavailable(f"cannot connect to the bus: {e}") from e
        return cls(bus, timeout)

    async def close(self) -> None:
        if self.bus.connected:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.wait_for_disconnect(), 1.0)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- raw calls ----------------------------------------------------------------------------

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        unix_fds: list[int] | None = None,
        destination: str = BUS_NAME,
    ) -> list[Any]:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            unix_fds=unix_fds or [],
        )
        if not self.bus.connected:
            raise ServiceUnavailable("the bus connection is closed")
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), self.timeout)
        except TimeoutError as e:
            raise ServiceUnavailable(
                f"no answer to {member} within {self.timeout:g} s",
                "org.freedesktop.DBus.Error.NoReply",
            ) from e
        except (EOFError, OSError) as e:
            raise ServiceUnavailable(f"lost the bus connection: {e}") from e
        if reply is None:
            raise ServiceUnavailable(f"no answer to {member}: the bus connection closed")
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""
            raise from_dbus(reply.error_name or "", text)
        return list(reply.body)

    async def _bus_call(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        return await self._call(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            member,
            signature,
            body,
            destination="org.freedesktop.DBus",
        )

    async def _get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self._call(path, PROPERTIES_IFACE, "GetAll", "s", [interface])
        result: dict[str, Any] = unpack_variants(props)
        return result

    # -- the API ------------------------------------------------------------------------------

    async def export(
        self,
        source: str | int,
        to: str,
        read_only: bool = True,
        devid: int | None = None,
        direct_io: bool | None = None,
    ) -> ExportInfo:
        """Export a file or block device (a path, or an open fd: UDisks2-style) to domain `to`.

        A path is made absolute here (the service does not share the caller's cwd). An fd is
        passed as UNIX_FD and stays owned (and open) in the caller.
        """
        if not to:
            raise UsageError("the frontend domain is empty: name the domain to export to")
        options = export_options(read_only, devid, direct_io)
        if isinstance(source, int):
            if source < 0:
                raise UsageError(f"{source} is not a file descriptor")
            (path,) = await self._call(
                MANAGER_PATH, MANAGER_IFACE, "ExportFd", "hsa{sv}", [0, to, options], [source]
            )
        else:
            if not source:
                raise UsageError("the source path is empty")
            (path,) = await self._call(
                MANAGER_PATH,
                MANAGER_IFACE,
                "Export",
                "ssa{sv}",
                [os.path.abspath(source), to, options],
            )
        return await self.get_export(str(path))

    async def get_export(self, target: str) -> ExportInfo:
        """One export by object path or short id."""
        path = export_path(target)
        return ExportInfo.from_properties(path, await self._get_all(path, EXPORT_IFACE))

    async def list_exports(self) -> list[ExportInfo]:
        """All exports, ordered by their number."""
        (objects,) = await self._call(MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        exports = [
            ExportInfo.from_properties(str(path), unpack_variants(ifaces[EXPORT_IFACE]))
            for path, ifaces in objects.items()
            if EXPORT_IFACE in ifaces
        ]
        return sorted(exports, key=_export_sort_key)

    async def find_by_backend_path(self, backend_path: str) -> ExportInfo:
        for info in await self.list_exports():
            if info.backend_path == backend_path.rstrip("/"):
                return info
        raise NotFound(f"no export has backend path {backend_path}")

    async def detach(self, target: ExportInfo | str) -> None:
        """Detach an export: an ExportInfo, an object path, a short id, or its backend path.

        A backend path is looked up among the exports (the CLI's use); to run libxl's block
        script `remove` step use `detach_backend`.
        """
        if isinstance(target, ExportInfo):
            path = target.export
        elif target.startswith(BACKEND_PATH_PREFIX):
            path = (await self.find_by_backend_path(target)).export
        else:
            path = export_path(target)
        await self._call(MANAGER_PATH, MANAGER_IFACE, "DetachExport", "o", [path])

    async def attach(self, backend_path: str) -> str:
        """libxl's `add` step: policyd attaches what the backend dir's params/mode name.

        Returns the export's object path. Caller must be uid 0.
        """
        (path,) = await self._call(MANAGER_PATH, MANAGER_IFACE, "Attach", "s", [backend_path])
        return str(path)

    async def detach_backend(self, backend_path: str) -> None:
        """libxl's `remove` step for a backend dir attached with `attach`. Caller: uid 0."""
        await self._call(MANAGER_PATH, MANAGER_IFACE, "Detach", "s", [backend_path])

    async def status(self) -> Status:
        return Status.from_properties(await self._get_all(MANAGER_PATH, MANAGER_IFACE))

    async def subscribe(self, callback: EventCallback) -> Subscription:
        """Start watching; `callback(event)` runs on this loop for every change.

        The returned Subscription already holds the current `exports` and `status` (None when
        the service is not running); events carry changes from then on.
        """
        sub = Subscription(self, callback)
        try:
            await sub._start()
        except BaseException:
            await sub.close()
            raise
        return sub

    async def watch(self) -> AsyncIterator[Event]:
        """Events as an async iterator: `async for event in client.watch(): ...`."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        sub = await self.subscribe(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            await sub.close()


def _export_sort_key(info: ExportInfo) -> tuple[int, str]:
    short = info.id
    return (int(short), "") if short.isdigit() else (1 << 62, short)
