"""Who may call what: the access rules of the D-Bus methods, the caller's identity, polkit.

Unprivileged policyd code; the caller's identity comes from the bus daemon
(GetConnectionUnixUser on the message's unique sender name), or, on the block socket
(policyd.bus.blocksocket), from the kernel (SO_PEERCRED), never from the message body. Each
method's access rule and polkit action are in its row of policyd.bus.service.METHODS; this
module applies them (authorize). polkit's subject is the caller's bus name (policyd.bus.polkit).
"""

from __future__ import annotations

import enum
import functools
import grp
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from policyd import audit
from policyd.bus import polkit
from policyd.errors import AccessDenied, PolicydError

POLKIT_ATTACH = "org.qubes.blockbroker.attach"
POLKIT_EXPORT = "org.qubes.blockbroker.export"
POLKIT_DETACH = "org.qubes.blockbroker.detach"
POLKIT_APPROVE = "org.qubes.blockbroker.approve"  # a person decides a VM's request
POLKIT_REQUEST_EXPORT = "org.qubes.blockbroker.request-export"
BRIDGE_GROUP = "blockbroker-qrexec"
ROOT_UID = 0
_V = TypeVar("_V")


class Access(enum.Enum):
    """Who may call a method."""

    ROOT = "uid 0 only"  # libxl's Attach and Detach
    ROOT_OR_POLKIT = "uid 0, else polkit (interactive)"  # an administrator's GUI or CLI
    BRIDGE_OR_POLKIT = "uid 0 or the qrexec bridge's group, else polkit (not interactive)"
    POLKIT = "polkit, interactive, for every caller"  # a person decides (polkit passes uid 0)


class CallerCache:
    """What the bus daemon said about each caller (uid; membership of BRIDGE_GROUP), by unique
    name. A unique name is never reused while the bus runs and a connection's credentials never
    change, so an entry stays right until the name goes; the service drops it on NameOwnerChanged
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
    member: str,
    access: Access,
    action: str,
    details: Mapping[str, str] | None = None,
    cache: CallerCache | None = None,
    undescribed: PolicydError | None = None,
) -> int:
    """The caller's uid if `access` lets it call `member`, else AccessDenied. `details` go to
    polkit (policyd's own, validated values: the actions' messages show them, polkit rules may
    test them with action.lookup). `undescribed`: why the call's object could not be described
    (no such object, invalid arguments); then no person is asked to authenticate for it: polkit
    is asked without interaction, and where it would have asked, that error is the answer (the
    call would end in it after the prompt; a caller polkit refuses still gets AccessDenied)."""
    if not sender:
        raise AccessDenied("the call has no sender; access denied")
    uid = await caller_uid(bus, sender, cache)
    ask = functools.partial(_ask_polkit, bus, sender, uid, member, action, details or {})
    if access is Access.POLKIT:
        await _ask_interactively(ask, undescribed)
        return uid
    if access is Access.BRIDGE_OR_POLKIT:
        if uid == ROOT_UID or await in_bridge_group(bus, sender, cache):
            return uid
        await ask(interactive=False)
        return uid
    if uid == ROOT_UID:
        return uid
    if access is Access.ROOT_OR_POLKIT:
        await _ask_interactively(ask, undescribed)
        return uid
    require_root(uid, member, action)
    return uid


def require_root(uid: int, member: str, action: str) -> None:
    """Access.ROOT for a caller whose uid is known (from the bus daemon, or SO_PEERCRED on
    policyd's block socket): AccessDenied unless it is uid 0."""
    if uid != ROOT_UID:
        raise AccessDenied(
            f"{member} needs uid 0 (polkit action {action}); the caller is uid {uid}: "
            "run it as root"
        )


async def _ask_interactively(
    ask: Callable[..., Awaitable[None]], undescribed: PolicydError | None
) -> None:
    if undescribed is None:
        await ask(interactive=True)
        return
    try:
        await ask(interactive=False, refusal_if_challenged=False)
    except polkit.AuthenticationNeeded:
        raise undescribed from None


async def _ask_polkit(
    bus: MessageBus,
    sender: str,
    uid: int,
    member: str,
    action: str,
    details: Mapping[str, str],
    *,
    interactive: bool,
    refusal_if_challenged: bool = True,
) -> None:
    """polkit's decision; a refusal is audited (who tried what) and raised. A challenge (no
    agent answered, or none was asked) is a refusal unless `refusal_if_challenged` is False."""
    try:
        async with polkit.LIMITER.slot(uid):
            await polkit.check_authorization(bus, sender, action, details, interactive=interactive)
    except AccessDenied as e:
        if isinstance(e, polkit.AuthenticationNeeded) and not refusal_if_challenged:
            raise
        audit.audit(
            "refused",
            operation=member,
            decided_by=f"polkit {action}",
            caller=f"uid={uid} bus={sender}",
            reason=e.text,
            **details,
        )
        raise
