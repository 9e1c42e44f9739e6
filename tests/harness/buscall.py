"""Run D-Bus method calls on the stack's bus from a child process and print the outcomes as JSON.

Test helper, run by harness.rawbus as a child process, often as an unprivileged uid (setpriv), so
the caller the bus daemon and polkit see is really that uid. It imports nothing of the project
(the child may not see tests/ on its path). Arguments: ADDRESS CALLS-JSON, CALLS-JSON a list of
[DEST, PATH, IFACE, MEMBER, SIG, BODY, FD-PATHS]; in BODY an a{sv} is an object of [signature,
value] pairs; FD-PATHS are files opened read-only and sent as the call's unix fds (BODY names
them by index). Prints {"uid": its uid}, then one {"error": name or null, "message": ...,
"body": [...]} a call, all on one connection.

With --hold IFACE first (one call), the connection stays open after the call (a requester that
is still waiting, like the bridge): each line on stdin names a method of IFACE (Withdraw,
Approve, Deny) to call on the object path the first call returned, answered like the first; EOF
disconnects.
"""

from __future__ import annotations

import asyncio
import json
import os
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


async def hold(bus: MessageBus, dest: str, iface: str, first: Message) -> None:
    print(json.dumps(outcome(first)), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        reply = await bus.call(
            Message(destination=dest, path=first.body[0], member=line, interface=iface)
        )
        assert reply is not None
        print(json.dumps(outcome(reply)), flush=True)


async def main(address: str, calls: str, hold_iface: str | None = None) -> None:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    print(json.dumps({"uid": os.getuid()}), flush=True)
    for dest, path, iface, member, sig, body, fd_paths in json.loads(calls):
        fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in fd_paths]
        try:
            reply = await bus.call(
                Message(destination=dest, path=path, interface=iface, member=member,
                        signature=sig, body=[to_dbus(v) for v in body], unix_fds=fds)
            )  # fmt: skip
        finally:
            for fd in fds:
                os.close(fd)
        assert reply is not None
        if hold_iface is not None and reply.message_type is MessageType.METHOD_RETURN:
            await hold(bus, dest, hold_iface, reply)
        else:
            print(json.dumps(outcome(reply)), flush=True)
    bus.disconnect()


if __name__ == "__main__":
    if sys.argv[1] == "--hold":
        asyncio.run(main(sys.argv[3], sys.argv[4], hold_iface=sys.argv[2]))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
