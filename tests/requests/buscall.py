"""Run one D-Bus method call on the stack's bus and print the outcome as JSON.

Test helper, run as a child process, often as an unprivileged uid (setpriv), so the caller the
bus daemon and polkit see is really that uid. Arguments: ADDRESS DEST PATH IFACE MEMBER SIG
BODY-JSON; in BODY-JSON an a{sv} is an object of [signature, value] pairs. Prints
{"error": name or null, "message": ..., "body": [...]}.

With --hold first, the connection stays open after the call (a requester that is still
waiting, like the bridge): each line on stdin names a method (Withdraw, Approve, Deny) to call
on the object path the first call returned, answered like the first; EOF disconnects.
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


def outcome(reply: Message) -> dict[str, Any]:
    if reply.message_type is MessageType.ERROR:
        return {"error": reply.error_name, "message": str(reply.body[0] if reply.body else "")}
    return {"error": None, "body": from_dbus(reply.body)}


async def hold(bus: MessageBus, dest: str, first: Message) -> None:
    print(json.dumps(outcome(first)), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        reply = await bus.call(
            Message(
                destination=dest,
                path=first.body[0],
                member=line,
                interface="org.qubes.BlockBroker1.Request",
            )
        )
        assert reply is not None
        print(json.dumps(outcome(reply)), flush=True)


async def main(address: str, dest: str, path: str, iface: str, member: str, sig: str,
               body: str, keep: bool = False) -> None:  # fmt: skip
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
    if keep and reply.message_type is MessageType.METHOD_RETURN:
        await hold(bus, dest, reply)
    else:
        print(json.dumps(outcome(reply)), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    if sys.argv[1] == "--hold":
        asyncio.run(main(*sys.argv[2:9], keep=True))
    else:
        asyncio.run(main(*sys.argv[1:8]))
