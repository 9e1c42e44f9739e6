"""A real polkit authentication agent (pkttyagent) answering for one caller of the stack's bus.

Test harness, runs as root; the caller and the agent run as the given user. The caller is a
child process that connects to the stack's bus and makes the calls it is sent; pkttyagent,
registered for the caller's pid (`--process`), runs on a pseudo-terminal that this module
reads (the prompt text) and types into (the password). pkttyagent is Debian's polkitd package.

pkttyagent has polkit-agent-helper-1 (setuid root) check the password with PAM and report to
polkitd; the helper clears its environment and always uses the default system bus socket, so
the agent runs in a private mount namespace where /run/dbus/system_bus_socket is the stack's
bus socket (a tmpfs over /run/dbus: the host's /run/dbus is not touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.names import BUS_NAME
from harness.rawbus import as_user

PKTTYAGENT = Path("/usr/bin/pkttyagent")
SYSTEM_BUS_DIR = Path("/run/dbus")
WAIT_S = 30.0
PASSWORD_PROMPT = b"Password: "

# The caller: connects, says its pid, then makes one call a line ([path, iface, member, sig,
# body]; in body an a{sv} is an object of [signature, value] pairs) and prints the outcome.
CALLER = r"""
import asyncio, json, os, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

def to_dbus(v):
    return {k: Variant(*x) for k, x in v.items()} if isinstance(v, dict) else v

async def main(address, dest):
    bus = await MessageBus(bus_address=address).connect()
    print(json.dumps({"pid": os.getpid(), "name": bus.unique_name}), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        path, iface, member, sig, body = json.loads(line)
        reply = await bus.call(Message(destination=dest, path=path, interface=iface,
                                       member=member, signature=sig,
                                       body=[to_dbus(v) for v in body]))
        if reply.message_type is MessageType.ERROR:
            out = {"error": reply.error_name, "message": str(reply.body[0] if reply.body else "")}
        else:
            out = {"error": None, "body": reply.body}
        print(json.dumps(out), flush=True)
    bus.disconnect()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def bus_socket(address: str) -> Path:
    """The socket path of a unix:path= bus address."""
    for part in address.split(";")[0].removeprefix("unix:").split(","):
        if part.startswith("path="):
            return Path(part.removeprefix("path="))
    raise ValueError(f"not a unix:path= address: {address}")


@dataclass
class Agent:
    """pkttyagent on a pty, and everything it printed so far (`screen`)."""

    pid: int
    master: int
    screen: bytearray = field(default_factory=bytearray)

    def read_until(self, marker: bytes, timeout_s: float = WAIT_S) -> bool:
        """Read the terminal until `marker` has appeared (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return marker in self.screen
        return True

    def _read(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the agent closed the terminal
            return False
        self.screen += data
        return bool(data)

    def type_password(self, text: str, timeout_s: float = WAIT_S) -> None:
        """Type once the agent has turned echo off: it does so with TCSAFLUSH after printing
        the prompt, which discards whatever was typed before."""
        deadline = time.monotonic() + timeout_s
        while termios.tcgetattr(self.master)[3] & termios.ECHO:
            assert time.monotonic() < deadline, "the agent never turned echo off"
            time.sleep(0.01)
        os.write(self.master, text.encode() + b"\n")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            self._read(0.05)
        os.close(self.master)


class Caller:
    """A bus client running as `user`; its calls are answered by whatever agent serves it."""

    def __init__(self, address: str, user: str) -> None:
        argv = [*as_user(user), sys.executable, "-c", CALLER, address, BUS_NAME]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.pid, self.name = int(hello["pid"]), str(hello["name"])

    def send(self, path: str, iface: str, member: str, sig: str = "",
             body: list[Any] | None = None) -> None:  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([path, iface, member, sig, body or []]) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, "the call was not answered"
        out: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=WAIT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def agent_for(caller: Caller, user: str, bus_address: str) -> Iterator[Agent]:
    """pkttyagent as `user`, registered for the caller's process, on a pty; yielded once
    polkitd has its registration (--notify-fd)."""
    sock = bus_socket(bus_address)
    notify_r, notify_w = os.pipe()
    os.set_inheritable(notify_w, True)
    target = SYSTEM_BUS_DIR / "system_bus_socket"
    agent = [str(PKTTYAGENT), "--process", str(caller.pid), "--notify-fd", str(notify_w)]
    script = (
        f"mount -t tmpfs -o mode=0755 tmpfs {SYSTEM_BUS_DIR} && touch {target} && "
        f"mount --bind {shlex.quote(str(sock))} {target} && "
        f"exec {shlex.join([*as_user(user), *agent])}"
    )
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "TERM": "dumb"}
    pid, master = pty.fork()
    if pid == 0:  # the child: nothing but exec
        try:
            os.close(notify_r)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(notify_w)
    running = Agent(pid, master)
    try:
        # pkttyagent closes the notify fd once registered; EOF is the signal
        ready, _, _ = select.select([notify_r], [], [], WAIT_S)
        registered = bool(ready) and os.read(notify_r, 1) == b""
        running.read_until(b"\0", 0.2)  # whatever it printed (errors) goes into the screen
        assert registered, f"pkttyagent did not register: {bytes(running.screen)!r}"
        yield running
    finally:
        os.close(notify_r)
        running.stop()
