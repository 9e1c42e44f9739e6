"""Run one D-Bus method call on the stack's bus and print the outcome as JSON.

Test helper, run as a child process, often as an unprivileged uid (setpriv), so the caller the
bus daemon and polkit see is really that uid. Arguments: ADDRESS DEST PATH IFACE MEMBER SIG
BODY-JSON; in BODY-JSON an a{sv} is an object of [signature, value] pairs. Prints
{"error": name or null, "message": ..., "body": [...]}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus


def to_dbus(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: Variant(v[0], v[1]) for k, v in value.items()}
    return value


def from_dbus(value: Any) -> Any:
    if isinstance(value, Variant):
        return from_dbus(value.value)
    if isinstance(value, dict):
        return {k: from_dbus(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dbus(v) for v in value]
    return value


async def main(address: str, dest: str, path: str, iface: str, member: str, sig: str,
               body: str) -> None:  # fmt: skip
    bus = await MessageBus(bus_address=address).connect()
    reply = await bus.call(
        Message(
            destination=dest,
            path=path,
            interface=iface,
            member=member,
            signature=sig,
            body=[to_dbus(v) for v in json.loads(body)],
        )
    )
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        out = {"error": reply.error_name, "message": str(reply.body[0] if reply.body else "")}
    else:
        out = {"error": None, "body": from_dbus(reply.body)}
    print(json.dumps(out))
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:8]))
