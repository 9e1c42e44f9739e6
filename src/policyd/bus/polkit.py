"""polkit client: CheckAuthorization for a caller identified by its bus name.

Unprivileged policyd code. The subject is always the caller's unique bus name
("system-bus-name"), never a pid (pids are reused; polkit resolves the name itself through the
bus daemon). Anything but a clear "authorized" answer - polkitd absent, an error reply, a
malformed reply, a dismissed dialog, no answer within POLKIT_TIMEOUT_S - is AccessDenied
(fail closed). Checks in flight are bounded (Limiter): a caller that opens authentication
dialogs and never answers them must not use up policyd's pending-reply budget with the bus
daemon, which libxl's Attach needs too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from policyd.errors import AccessDenied, Busy

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1
MAX_DETAIL_CHARS = 256
POLKIT_TIMEOUT_S = 300.0  # a person may take a while at an authentication dialog, not forever
MAX_CHECKS_PER_UID = 4
MAX_CHECKS = 32  # well below dbus-daemon's 128 pending replies per connection


class Limiter:
    """Bounds the polkit checks in flight, per caller uid and in total."""

    def __init__(self, per_uid: int = MAX_CHECKS_PER_UID, total: int = MAX_CHECKS) -> None:
        self.per_uid, self.total = per_uid, total
        self.in_flight: Counter[int] = Counter()

    @asynccontextmanager
    async def slot(self, uid: int) -> AsyncIterator[None]:
        if self.in_flight[uid] >= self.per_uid or self.in_flight.total() >= self.total:
            raise Busy(
                f"too many authorization checks are waiting (uid {uid}): answer or cancel the "
                "open authentication dialogs, then try again"
            )
        self.in_flight[uid] += 1
        try:
            yield
        finally:
            self.in_flight[uid] -= 1
            if not self.in_flight[uid]:
                del self.in_flight[uid]


LIMITER = Limiter()


class AuthenticationNeeded(AccessDenied):
    """polkit would authorize the caller if a person authenticated (a challenge): the
    interactive check asks the caller's agent; a check without interaction ends here."""


async def check_authorization(
    bus: MessageBus,
    sender: str,
    action_id: str,
    details: Mapping[str, str] | None = None,
    *,
    interactive: bool = True,
) -> None:
    """Return if polkit authorizes `sender` for `action_id`, else raise AccessDenied.

    With `interactive`, polkit may ask the caller's authentication agent (auth_admin); the
    call then lasts as long as the dialog.
    """
    subject = ["system-bus-name", {"name": Variant("s", sender)}]
    safe_details = {k: v[:MAX_DETAIL_CHARS] for k, v in (details or {}).items()}
    flags = ALLOW_USER_INTERACTION if interactive else 0
    call = bus.call(
        Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action_id, safe_details, flags, ""],
        )
    )
    try:
        reply = await asyncio.wait_for(call, POLKIT_TIMEOUT_S)
    except TimeoutError:
        raise AccessDenied(
            f"polkit did not decide {action_id} within {POLKIT_TIMEOUT_S:g} s; access denied"
        ) from None
    if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
        error = getattr(reply, "error_name", None)
        raise AccessDenied(
            f"polkit could not decide {action_id} ({error}); access denied: is polkitd running?"
        )
    if reply.signature != "(bba{ss})":
        raise AccessDenied(f"polkit gave a malformed answer for {action_id}; access denied")
    is_authorized, is_challenge, _ = reply.body[0]
    if is_authorized is True:
        return
    if is_challenge:
        raise AuthenticationNeeded(
            f"{action_id} needs authentication and no authentication agent answered; "
            "run the command from a session with a polkit agent"
        )
    raise AccessDenied(f"polkit does not authorize this caller for {action_id}")
