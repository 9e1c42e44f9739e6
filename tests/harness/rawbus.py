"""A raw D-Bus client of the stack's bus: build a call to blockbroker, send it from this process
(async, or synchronously on a connection with its own event loop), or send it from a child
process running as a given uid (harness/buscall.py) and get the reply or the error name.

Test harness, runs as root; the child runs as whichever uid the test names. Replies are trusted
no more than any other output under test: callers assert on them.
"""

from __future__ import annotations

import asyncio
import json
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from harness.names import BUS_NAME, MANAGER, MANAGER_IFACE, short_error

BUSCALL = Path(__file__).with_name("buscall.py")
CHILD_TIMEOUT_S = 120


def message(
    member: str,
    sig: str = "",
    body: list[Any] | None = None,
    *,
    path: str = MANAGER,
    iface: str | None = MANAGER_IFACE,
    dest: str = BUS_NAME,
    fds: list[int] | None = None,
) -> Message:
    """A method call, by default to blockbroker's Manager."""
    return Message(destination=dest, path=path, interface=iface, member=member, signature=sig,
                   body=body or [], unix_fds=fds or [])  # fmt: skip


async def connect(address: str) -> MessageBus:
    """A connection to the bus at `address` that may pass unix fds."""
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


async def call(bus: MessageBus, member: str, sig: str = "", body: list[Any] | None = None,
               **kw: Any) -> Message:  # fmt: skip
    """One call (message()'s arguments) on an open connection; the reply or error message."""
    reply = await bus.call(message(member, sig, body, **kw))
    assert reply is not None
    return reply


class SyncBus:
    """A connection to the bus with its own event loop, for synchronous test code."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus = self.loop.run_until_complete(connect(address))

    def send(self, msg: Message) -> Message:
        reply = self.loop.run_until_complete(self.bus.call(msg))
        assert reply is not None
        return reply

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def as_user(user: int | str, groups: tuple[int, ...] = ()) -> list[str]:
    """setpriv prefix: run as `user` (its own primary group) with exactly `groups` besides."""
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", extra]


def _child_argv(address: str, calls: list[list[Any]], user: int | str | None,
                groups: tuple[int, ...], hold_iface: str | None = None) -> list[str]:  # fmt: skip
    hold = ["--hold", hold_iface] if hold_iface is not None else []
    argv = [sys.executable, str(BUSCALL), *hold, address, json.dumps(calls)]
    return argv if user is None else [*as_user(user, groups), *argv]


def _answer(line: str, short: bool = True) -> dict[str, Any]:
    """One outcome line of the child; with `short`, the service's error names short (after
    names.ERROR_PREFIX)."""
    out: dict[str, Any] = json.loads(line)
    if short:
        out["error"] = short_error(out["error"])
    return out


def child_call(
    member: str,
    sig: str = "",
    body: list[Any] | None = None,
    *,
    path: str = MANAGER,
    iface: str = MANAGER_IFACE,
    dest: str = BUS_NAME,
    fd_paths: tuple[str, ...] = (),
) -> list[Any]:
    """One call for calls_as()/call_as()/HeldCall; `fd_paths` are opened by the child."""
    return [dest, path, iface, member, sig, body or [], list(fd_paths)]


def calls_as(address: str, calls: list[list[Any]], user: int | str | None = None,
             groups: tuple[int, ...] = (), short: bool = True,
             ) -> tuple[int, list[dict[str, Any]]]:  # fmt: skip
    """Make `calls` (child_call()s) on one connection of a child process running as `user`
    (else root) with `groups`. Returns the child's uid and one outcome a call: {"error": None
    or the error name (with `short`, the service's own short), "message": its text, "body":
    the reply}."""
    argv = _child_argv(address, calls, user, groups)
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=CHILD_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, *lines = result.stdout.splitlines()
    outcomes = [_answer(line, short) for line in lines]
    assert len(outcomes) == len(calls), result.stdout
    for out in outcomes:
        assert "Traceback" not in out.get("message", "")
    return int(json.loads(first)["uid"]), outcomes


def call_as(address: str, member: str, sig: str = "", body: list[Any] | None = None, *,
            user: int | str | None = None, groups: tuple[int, ...] = (),
            **kw: Any) -> dict[str, Any]:  # fmt: skip
    """One call (child_call()'s arguments) from a child process as `user`; its outcome."""
    return calls_as(address, [child_call(member, sig, body, **kw)], user, groups)[1][0]


class HeldCall:
    """A caller that stays connected after its first call (like the bridge waiting for a
    decision), running as `user` with `groups`; `send(member)` calls a method of `hold_iface`
    on the object path the first call returned, on the same connection."""

    def __init__(self, address: str, call: list[Any], hold_iface: str,
                 user: int | str | None = None, groups: tuple[int, ...] = ()) -> None:  # fmt: skip
        argv = _child_argv(address, [call], user, groups, hold_iface)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.uid = int(json.loads(self.proc.stdout.readline())["uid"])
        self.first = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return _answer(self.proc.stdout.readline())

    @property
    def path(self) -> str:
        assert self.first["error"] is None, self.first
        return str(self.first["body"][0])

    def send(self, member: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(member + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
