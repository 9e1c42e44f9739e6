"""Who may call what: the one table of mutating methods and their polkit actions.

Unprivileged policyd code; the caller's identity comes from the bus daemon
(GetConnectionUnixUser on the message's unique sender name), never from the message body.
For now every mutating method needs uid 0; the polkit check (subject = the caller's bus name)
replaces that rule with a later issue, and the table below is what it will consult. The service
refuses to start if a declared method is in neither table.
"""

from __future__ import annotations

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from policyd.errors import AccessDenied
from policyd.interfaces import EXPORT_IFACE, MANAGER_IFACE

POLKIT_ATTACH = "org.qubes.blockbroker.attach"
POLKIT_EXPORT = "org.qubes.blockbroker.export"
POLKIT_DETACH = "org.qubes.blockbroker.detach"
POLKIT_APPROVE = "org.qubes.blockbroker.approve"  # pending requests (a later issue)

# (interface, member) -> polkit action, for every method that changes state.
MUTATING_METHODS: dict[tuple[str, str], str] = {
    (MANAGER_IFACE, "Attach"): POLKIT_ATTACH,
    (MANAGER_IFACE, "Detach"): POLKIT_ATTACH,
    (MANAGER_IFACE, "Export"): POLKIT_EXPORT,
    (MANAGER_IFACE, "ExportFd"): POLKIT_EXPORT,
    (MANAGER_IFACE, "DetachExport"): POLKIT_DETACH,
    (EXPORT_IFACE, "Detach"): POLKIT_DETACH,
}
# Methods that change nothing; anyone the bus policy lets through may call them.
READ_ONLY_METHODS: frozenset[tuple[str, str]] = frozenset()

ROOT_UID = 0


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


async def caller_uid(bus: MessageBus, sender: str) -> int:
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="GetConnectionUnixUser",
            signature="s",
            body=[sender],
        )
    )
    if reply is None or reply.message_type != MessageType.METHOD_RETURN or reply.signature != "u":
        raise AccessDenied("the caller's uid could not be determined; access denied")
    uid = reply.body[0]
    if not isinstance(uid, int):
        raise AccessDenied("the caller's uid could not be determined; access denied")
    return uid


async def authorize(bus: MessageBus, sender: str | None, interface: str, member: str) -> int:
    """The caller's uid if it may call interface.member, else AccessDenied."""
    action = MUTATING_METHODS.get((interface, member))
    if action is None:
        if (interface, member) in READ_ONLY_METHODS:
            return -1
        raise AccessDenied(f"{interface}.{member} is not in the authorization table")
    if not sender:
        raise AccessDenied("the call has no sender; access denied")
    uid = await caller_uid(bus, sender)
    if uid != ROOT_UID:
        raise AccessDenied(
            f"{member} needs uid 0 (polkit action {action}); the caller is uid {uid}: "
            "run it as root"
        )
    return uid
