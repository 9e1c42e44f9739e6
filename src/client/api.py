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
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Final

from dbus_fast import BusType, Message, MessageType, Variant, unpack_variants
from dbus_fast.aio import MessageBus

from client.errors import NotFound, ServiceUnavailable, UsageError, from_dbus
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
from client.watch import OBJECT_MANAGER_IFACE, PROPERTIES_IFACE, EventCallback, Subscription

DEFAULT_TIMEOUT: Final = 25.0  # seconds, as libdbus' default method-call timeout
U32_MAX: Final = 0xFFFFFFFF
BACKEND_PATH_PREFIX: Final = "/local/domain/"
RELATIVE_BACKEND_PREFIX: Final = "backend/"  # libxl's XENBUS_PATH form, relative to the backend


def is_backend_path(target: str) -> bool:
    return target.startswith((BACKEND_PATH_PREFIX, RELATIVE_BACKEND_PREFIX))


def export_path(target: str) -> str:
    """The export object path for an object path or a short id ("3")."""
    if target.startswith(EXPORT_PATH_PREFIX) and _is_numbered_path(target, EXPORT_PATH_PREFIX):
        return target
    if target.isdigit() and target.isascii():
        return EXPORT_PATH_PREFIX + str(int(target))
    raise UsageError(
        f"{target!r} is not an export: give its object path ({EXPORT_PATH_PREFIX}<n>), its "
        f"short id <n>, or its backend path ({BACKEND_PATH_PREFIX}...)"
    )


def request_path(target: str) -> str:
    """The request object path for an object path or a short id ("3")."""
    if target.startswith(REQUEST_PATH_PREFIX) and _is_numbered_path(target, REQUEST_PATH_PREFIX):
        return target
    if target.isdigit() and target.isascii():
        return REQUEST_PATH_PREFIX + str(int(target))
    raise UsageError(
        f"{target!r} is not an export request: give its object path ({REQUEST_PATH_PREFIX}<n>) "
        "or its short id <n> (see `blockbroker requests`)"
    )


def _is_numbered_path(path: str, prefix: str) -> bool:
    number = path[len(prefix) :]
    return number.isascii() and number.isdigit()


def export_options(
    read_only: bool = True,
    devid: int | None = None,
    direct_io: bool | None = None,
    dm_uuid: str | None = None,
) -> dict[str, Variant]:
    """The a{sv} options of Export/ExportFd; validates devid locally for a clear message."""
    options = {"read-only": Variant("b", bool(read_only))}
    if devid is not None:
        if not 0 <= devid <= U32_MAX:
            raise UsageError(f"devid {devid} is out of range (0..{U32_MAX})")
        options["devid"] = Variant("u", devid)
    if direct_io is not None:
        options["direct-io"] = Variant("b", bool(direct_io))
    if dm_uuid:
        options["dm-uuid"] = Variant("s", dm_uuid)
    return options


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
        dm_uuid: str | None = None,
    ) -> ExportInfo:
        """Export a file or block device (a path, or an open fd: UDisks2-style) to domain `to`.

        A path is made absolute here (the service does not share the caller's cwd). An fd is
        passed as UNIX_FD and stays owned (and open) in the caller. `dm_uuid`: the device must
        be the device-mapper device with this uuid (LVM's LVM-<vg uuid><lv uuid>), else
        DeviceChanged.
        """
        if not to:
            raise UsageError("the frontend domain is empty: name the domain to export to")
        options = export_options(read_only, devid, direct_io, dm_uuid)
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

    async def managed_objects(self) -> tuple[list[ExportInfo], list[RequestInfo]]:
        """All exports and all export requests (one GetManagedObjects), each by number."""
        (objects,) = await self._call(MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        exports, requests = [], []
        for path, ifaces in objects.items():
            if EXPORT_IFACE in ifaces:
                props = unpack_variants(ifaces[EXPORT_IFACE])
                exports.append(ExportInfo.from_properties(str(path), props))
            if REQUEST_IFACE in ifaces:
                props = unpack_variants(ifaces[REQUEST_IFACE])
                requests.append(RequestInfo.from_properties(str(path), props))
        exports.sort(key=lambda e: _number_key(e.id))
        requests.sort(key=lambda r: _number_key(r.id))
        return exports, requests

    async def list_exports(self) -> list[ExportInfo]:
        """All exports, ordered by their number."""
        return (await self.managed_objects())[0]

    async def list_requests(self) -> list[RequestInfo]:
        """Requests from VMs to export one of their devices (pending ones wait for a person)."""
        return (await self.managed_objects())[1]

    async def get_request(self, target: str) -> RequestInfo:
        path = request_path(target)
        return RequestInfo.from_properties(path, await self._get_all(path, REQUEST_IFACE))

    async def approve(self, target: RequestInfo | str) -> None:
        """Approve a pending request (polkit: org.qubes.blockbroker.approve, auth_admin).

        policyd writes the nodes pinned to the request's Diskseq; DeviceChanged if the VM's
        device is no longer the one the request named, Expired if it timed out.
        """
        path = target.request if isinstance(target, RequestInfo) else request_path(target)
        await self._call(path, REQUEST_IFACE, "Approve")

    async def deny(self, target: RequestInfo | str) -> None:
        path = target.request if isinstance(target, RequestInfo) else request_path(target)
        await self._call(path, REQUEST_IFACE, "Deny")

    async def find_by_backend_path(self, backend_path: str) -> ExportInfo:
        """The export whose BackendPath is this (absolute, or libxl's relative backend/...)."""
        wanted = backend_path.rstrip("/")
        for info in await self.list_exports():
            absolute = f"{BACKEND_PATH_PREFIX}{info.backend_domid}/{wanted}"
            if info.backend_path in (wanted, absolute):
                return info
        raise NotFound(f"no export has backend path {backend_path}; see `blockbroker list`")

    async def detach(self, target: ExportInfo | str) -> None:
        """Detach an export: an ExportInfo, an object path, a short id, or its backend path.

        A backend path is looked up among the exports (the CLI's use); to run libxl's block
        script `remove` step use `detach_backend`.
        """
        if isinstance(target, ExportInfo):
            path = target.export
        elif is_backend_path(target):
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

        The returned Subscription already holds the current `exports`, `requests` and `status`
        (None when
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


def _number_key(short: str) -> tuple[int, str]:
    return (int(short), "") if short.isdigit() else (1 << 62, short)
