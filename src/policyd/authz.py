"""Who may call what: the one table of mutating methods and their polkit actions.

Unprivileged policyd code; the caller's identity comes from the bus daemon
(GetConnectionUnixUser on the message's unique sender name), never from the message body.
Attach/Detach (libxl's path) need uid 0; Export/ExportFd/DetachExport/Export.Detach pass for
uid 0 and ask polkit for anyone else; Approve/Deny of a VM's request ask polkit (subject =
the caller's bus name, policyd.polkit); RequestExport/Withdraw take root or the qrexec bridge's
group (from GetConnectionCredentials), else polkit. The service
refuses to start if a declared method is in neither table.
"""

from __future__ import annotations

import grp
from collections.abc import Mapping
from typing import TypeVar

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from policyd import audit, polkit
from policyd.errors import AccessDenied
from policyd.interfaces import EXPORT_IFACE, MANAGER_IFACE
from policyd.requests import REQUEST_IFACE

POLKIT_ATTACH = "org.qubes.blockbroker.attach"
POLKIT_EXPORT = "org.qubes.blockbroker.export"
POLKIT_DETACH = "org.qubes.blockbroker.detach"
POLKIT_APPROVE = "org.qubes.blockbroker.approve"  # a person decides a VM's request: polkit
# RequestExport/Withdraw: root and the qrexec bridge's group; anyone else only if polkit says so
POLKIT_REQUEST_EXPORT = "org.qubes.blockbroker.request-export"
BRIDGE_GROUP = "blockbroker-qrexec"

# (interface, member) -> polkit action, for every method that changes state.
MUTATING_METHODS: dict[tuple[str, str], str] = {
    (MANAGER_IFACE, "Attach"): POLKIT_ATTACH,
    (MANAGER_IFACE, "Detach"): POLKIT_ATTACH,
    (MANAGER_IFACE, "Export"): POLKIT_EXPORT,
    (MANAGER_IFACE, "ExportFd"): POLKIT_EXPORT,
    (MANAGER_IFACE, "DetachExport"): POLKIT_DETACH,
    (EXPORT_IFACE, "Detach"): POLKIT_DETACH,
    (MANAGER_IFACE, "RequestExport"): POLKIT_REQUEST_EXPORT,
    (REQUEST_IFACE, "Approve"): POLKIT_APPROVE,
    (REQUEST_IFACE, "Deny"): POLKIT_APPROVE,
    (REQUEST_IFACE, "Withdraw"): POLKIT_REQUEST_EXPORT,
}
# Methods that change nothing; anyone the bus policy lets through may call them.
READ_ONLY_METHODS: frozenset[tuple[str, str]] = frozenset()

ROOT_UID = 0
_V = TypeVar("_V")


class StartupError(Exception):
    """policyd refuses to start: the message says what is misconfigured."""


def check_table(declared: set[tuple[str, str]]) -> None:
    """Every declared method is either read-only or has a polkit action, and vice versa."""
    missing = declared - set(MUTATING_METHODS) - READ_ONLY_METHODS
    if missing:
        raise StartupError(f"methods without a polkit action or read-only entry: {sorted(missing)}")
    stale = set(MUTATING_METHODS) - declared
    if stale:
        raise StartupError(f"polkit table names methods that do not exist: {sorted(stale)}")


class CallerCache:
    """What the bus daemon said about each caller (uid; membership of BRIDGE_GROUP), by unique
    name. A unique name is never reused while the bus runs and a connection's credentials never
    change, so an entry stays right until the name goes; Service drops it on NameOwnerChanged
    (see forget). Bounded: when full, the oldest entries go. Saves a bus round trip per call."""

    MAX_ENTRIES = 1024

    def __init__(self) -> None:
        self.uids: dict[str, int] = {}
        self.bridge: dict[str, bool] = {}

    def forget(self, name: str) -> None:
        self.uids.pop(name, None)
        self.bridge.pop(name, None)

    def store(self, table: dict[str, _V], name: str, value: _V) -> _V:
        while len(table) >= self.MAX_ENTRIES:
            del table[next(iter(table))]
        table[name] = value
        return value


async def caller_uid(bus: MessageBus, sender: str, cache: CallerCache | None = None) -> int:
    if cache is not None and sender in cache.uids:
        return cache.uids[sender]
    uid = await _caller_uid(bus, sender)
    return uid if cache is None else cache.store(cache.uids, sender, uid)


async def _caller_uid(bus: MessageBus, sender: str) -> int:
    reply = await bus_daemon_call(bus, "GetConnectionUnixUser", sender)
    if reply is None or reply.message_type != MessageType.METHOD_RETURN or reply.signature != "u":
        raise AccessDenied("the caller's uid could not be determined; access denied")
    uid = reply.body[0]
    if not isinstance(uid, int):
        raise AccessDenied("the caller's uid could not be determined; access denied")
    return uid


async def bus_daemon_call(bus: MessageBus, member: str, arg: str) -> Message | None:
    """A call of org.freedesktop.DBus's `member` with one string argument; its reply."""
    return await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature="s",
            body=[arg],
        )
    )


def bridge_gid() -> int | None:
    try:
        return grp.getgrnam(BRIDGE_GROUP).gr_gid
    except KeyError:
        return None


async def in_bridge_group(bus: MessageBus, sender: str, cache: CallerCache | None = None) -> bool:
    """True if the caller's groups (as the bus daemon saw them) include BRIDGE_GROUP."""
    if cache is not None and sender in cache.bridge:
        return cache.bridge[sender]
    member = await _in_bridge_group(bus, sender)
    # a failed lookup (False without an answer) is not remembered
    return member if cache is None or not member else cache.store(cache.bridge, sender, member)


async def _in_bridge_group(bus: MessageBus, sender: str) -> bool:
    gid = bridge_gid()
    if gid is None:
        return False
    reply = await bus_daemon_call(bus, "GetConnectionCredentials", sender)
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        return False
    groups = reply.body[0].get("UnixGroupIDs") if reply.signature == "a{sv}" else None
    return groups is not None and groups.signature == "au" and gid in groups.value


async def authorize(
    bus: MessageBus,
    sender: str | None,
    interface: str,
    member: str,
    details: Mapping[str, str] | None = None,
    cache: CallerCache | None = None,
) -> int:
    """The caller's uid if it may call interface.member, else AccessDenied. `details` go to
    polkit (policyd's own, validated values: polkit rules may test them with action.lookup)."""
    action = MUTATING_METHODS.get((interface, member))
    if action is None:
        if (interface, member) in READ_ONLY_METHODS:
            return -1
        raise AccessDenied(f"{interface}.{member} is not in the authorization table")
    if not sender:
        raise AccessDenied("the call has no sender; access denied")
    uid = await caller_uid(bus, sender, cache)
    if action == POLKIT_APPROVE:  # polkit itself authorizes uid 0
        await _ask_polkit(bus, sender, uid, member, action, details or {}, interactive=True)
        return uid
    if action == POLKIT_REQUEST_EXPORT:
        if uid == ROOT_UID or await in_bridge_group(bus, sender, cache):
            return uid
        await _ask_polkit(bus, sender, uid, member, action, details or {}, interactive=False)
        return uid
    if uid == ROOT_UID:
        return uid
    if action in (POLKIT_EXPORT, POLKIT_DETACH):  # an admin's GUI/CLI: polkit may say yes
        await _ask_polkit(bus, sender, uid, member, action, details or {}, interactive=True)
        return uid
    raise AccessDenied(
        f"{member} needs uid 0 (polkit action {action}); the caller is uid {uid}: run it as root"
    )


async def _ask_polkit(
    bus: MessageBus,
    sender: str,
    uid: int,
    member: str,
    action: str,
    details: Mapping[str, str],
    *,
    interactive: bool,
) -> None:
    """polkit's decision; a refusal is audited (who tried what) and raised."""
    try:
        async with polkit.LIMITER.slot(uid):
            await polkit.check_authorization(bus, sender, action, details, interactive=interactive)
    except AccessDenied as e:
        audit.audit(
            "refused",
            operation=member,
            decided_by=f"polkit {action}",
            caller=f"uid={uid} bus={sender}",
            reason=e.text,
            **details,
        )
        raise
