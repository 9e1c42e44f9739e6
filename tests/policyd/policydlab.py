"""Helpers for policyd's tests: a raw D-Bus client of the stack's bus, leak checks, libxl nodes.

Test code, runs as root against the shared host stack (harness.stack): real oxenstored, a private
dbus-daemon with the project's bus policy, the real broker and policyd as user blockbroker.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from harness import xenstore
from harness.stack import Stack

BUS_NAME = "org.qubes.BlockBroker1"
MANAGER = "/org/qubes/BlockBroker1"
MANAGER_IFACE = "org.qubes.BlockBroker1.Manager"
EXPORT_IFACE = "org.qubes.BlockBroker1.Export"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
ERROR_PREFIX = "org.qubes.BlockBroker1.Error."
XVDA, XVDB, XVDC = 51712, 51728, 51744
NOBODY = 65534
LOOP_SETTLE_S = 5.0


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


class Api:
    """Synchronous raw-message client (its own event loop), recording signals it sees."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus = self.loop.run_until_complete(connect(address))
        self.signals: list[Message] = []
        self.bus.add_message_handler(self._on_message)
        self._call_bus(
            "org.freedesktop.DBus", "AddMatch", "s", [f"type='signal',sender='{BUS_NAME}'"]
        )

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.interface != "org.freedesktop.DBus":
            self.signals.append(msg)
        return False

    def _call_bus(self, iface: str, member: str, sig: str, body: list[Any]) -> Message:
        return self.loop.run_until_complete(
            self.bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface=iface,
                    member=member,
                    signature=sig,
                    body=body,
                )
            )
        )

    def call(
        self,
        member: str,
        sig: str = "",
        body: list[Any] | None = None,
        *,
        path: str = MANAGER,
        iface: str | None = MANAGER_IFACE,
        fds: list[int] | None = None,
    ) -> Message:
        msg = Message(
            destination=BUS_NAME,
            path=path,
            interface=iface,
            member=member,
            signature=sig,
            body=body or [],
            unix_fds=fds or [],
        )
        reply = self.loop.run_until_complete(self.bus.call(msg))
        assert reply is not None
        return reply

    def ok(self, member: str, sig: str = "", body: list[Any] | None = None, **kw: Any) -> Any:
        reply = self.call(member, sig, body, **kw)
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return reply.body[0] if reply.body else None

    def err(self, member: str, sig: str = "", body: list[Any] | None = None, **kw: Any) -> str:
        """The short error name (after org.qubes.BlockBroker1.Error.) of a failing call."""
        reply = self.call(member, sig, body, **kw)
        assert reply.message_type is MessageType.ERROR, f"{member} unexpectedly succeeded"
        assert reply.error_name.startswith(ERROR_PREFIX), (reply.error_name, reply.body)
        assert "Traceback" not in str(reply.body)
        return reply.error_name[len(ERROR_PREFIX) :]

    def export(self, path: str | Path, frontend: str = "work", **options: Variant) -> str:
        return str(self.ok("Export", "ssa{sv}", [str(path), frontend, options]))

    def export_err(self, path: str | Path, frontend: str = "work", **options: Variant) -> str:
        return self.err("Export", "ssa{sv}", [str(path), frontend, options])

    def detach(self, export: str) -> None:
        self.ok("Detach", path=export, iface=EXPORT_IFACE)

    def props(self, path: str, iface: str = EXPORT_IFACE) -> dict[str, Any]:
        values = self.ok("GetAll", "s", [iface], path=path, iface=PROPS_IFACE)
        return {k: v.value for k, v in values.items()}

    def managed(self) -> dict[str, dict[str, Any]]:
        objects = self.ok("GetManagedObjects", path=MANAGER, iface=OM_IFACE)
        return {
            path: {k: v.value for k, v in ifaces[EXPORT_IFACE].items()}
            for path, ifaces in objects.items()
            if EXPORT_IFACE in ifaces
        }

    def introspect(self, path: str = MANAGER) -> str:
        return str(self.ok("Introspect", path=path, iface="org.freedesktop.DBus.Introspectable"))

    def pump(self) -> None:
        """Let queued signals arrive (a Ping round trip orders them before its reply)."""
        self.ok("Ping", path=MANAGER, iface="org.freedesktop.DBus.Peer")

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def ro(value: bool = True) -> Variant:
    return Variant("b", value)


def u32(value: int) -> Variant:
    return Variant("u", value)


def policyd_pid(stack: Stack) -> int:
    return stack.daemons["policyd"].pid


def held_block_fds(stack: Stack) -> list[tuple[int, int]]:
    """major:minor of every block device policyd holds an fd on."""
    held = []
    fd_dir = Path(f"/proc/{policyd_pid(stack)}/fd")
    for entry in fd_dir.iterdir():
        try:
            st = os.stat(entry)
        except FileNotFoundError:
            continue
        if stat.S_ISBLK(st.st_mode):
            held.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
    return sorted(held)


def open_fd_count(stack: Stack) -> int:
    return len(os.listdir(f"/proc/{policyd_pid(stack)}/fd"))


def loops_of(path: Path) -> list[str]:
    """Names of loop devices bound to `path` (scoped to this test's own file)."""
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == str(path):
            found.append(entry.name)
    return found


def loops_released(path: Path, settle_s: float = LOOP_SETTLE_S) -> bool:
    """True once no loop device is bound to `path`. Closing the last fd of an AUTOCLEAR loop
    clears it asynchronously in the kernel (a workqueue), so allow a bounded settle time."""
    deadline = time.monotonic() + settle_s
    while loops_of(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def vbd_nodes(stack: Stack) -> list[str]:
    """Every vbd dir under dom0's backend and the guests' device dirs."""
    found = []
    for domid in stack.domains.values():
        base = f"/local/domain/0/backend/vbd/{domid}"
        if stack.xs_exists(base):
            found += [f"{base}/{d}" for d in stack.xs_ls(base)]
        fe = f"/local/domain/{domid}/device/vbd"
        if stack.xs_exists(fe):
            found += [f"{fe}/{d}" for d in stack.xs_ls(fe)]
    return sorted(found)


def assert_clean(stack: Stack, *images: Path) -> None:
    """Nothing of ours left: no loop on our files, no vbd node, no block fd held by policyd."""
    for image in images:
        assert loops_released(image), f"loop device left on {image}: {loops_of(image)}"
    assert vbd_nodes(stack) == []
    assert held_block_fds(stack) == []


def write_libxl_vbd(
    stack: Stack,
    frontend_domid: int,
    devid: int,
    params: str,
    mode: str = "r",
    extra: dict[str, str] | None = None,
) -> str:
    """The nodes libxl's device_disk_add writes before it runs the block script (harness)."""
    return xenstore.write_libxl_vbd(stack.xs, frontend_domid, devid, params, mode, extra)


def xs_write_raw(stack: Stack, path: str, value: bytes) -> None:
    """Write bytes pyxs refuses to send (control characters, 8-bit) with xenstore-write."""
    subprocess.run(
        [b"xenstore-write", path.encode(), value], env=stack.env(), check=True, timeout=30
    )


def remove_libxl_vbd(stack: Stack, be: str) -> None:
    fe = stack.xs_read(f"{be}/frontend")
    stack.xs_rm(be)
    if fe:
        stack.xs_rm(fe)
    parent = be.rsplit("/", 1)[0]
    if stack.xs_exists(parent) and not stack.xs_ls(parent):
        stack.xs_rm(parent)


def run_as(uid: int, address: str, script: str) -> Any:
    """Run `script` (which prints one JSON value) in a child Python as `uid`."""
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
        ],
        env={"DBUS_ADDRESS": address, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
