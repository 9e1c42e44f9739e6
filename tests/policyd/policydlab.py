"""Helpers for policyd's tests: a client of the stack's bus, leak checks, libxl nodes.

Test code, runs as root against the shared host stack (harness.stack): real oxenstored, a private
dbus-daemon with the project's bus policy, the real broker and policyd as user blockbroker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from harness import loops, xenstore
from harness.loops import loops_of, loops_released
from harness.names import (
    BUS_NAME,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    ERROR_PREFIX,
    EXPORT_IFACE,
    INTROSPECTABLE_IFACE,
    MANAGER,
    OM_IFACE,
    PEER_IFACE,
    PROPS_IFACE,
    short_error,
)
from harness.rawbus import SyncBus, as_user, message
from harness.stack import Stack

XVDA, XVDB, XVDC = 51712, 51728, 51744
NOBODY = 65534


class Api(SyncBus):
    """Synchronous raw-message client (its own event loop), recording signals it sees."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.signals: list[Message] = []
        self.bus.add_message_handler(self._on_message)
        self.send(
            message("AddMatch", "s", [f"type='signal',sender='{BUS_NAME}'"], path=DBUS_PATH,
                    iface=DBUS_IFACE, dest=DBUS_NAME)
        )  # fmt: skip

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.interface != DBUS_IFACE:
            self.signals.append(msg)
        return False

    def call(self, member: str, sig: str = "", body: list[Any] | None = None,
             **kw: Any) -> Message:  # fmt: skip
        """One call (rawbus.message's keywords: path, iface, fds); the reply or error."""
        return self.send(message(member, sig, body, **kw))

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
        return str(short_error(reply.error_name))

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
        return str(self.ok("Introspect", path=path, iface=INTROSPECTABLE_IFACE))

    def pump(self) -> None:
        """Let queued signals arrive (a Ping round trip orders them before its reply)."""
        self.ok("Ping", path=MANAGER, iface=PEER_IFACE)


def ro(value: bool = True) -> Variant:
    return Variant("b", value)


def u32(value: int) -> Variant:
    return Variant("u", value)


def policyd_pid(stack: Stack) -> int:
    return stack.daemons["policyd"].pid


def held_block_fds(stack: Stack) -> list[tuple[int, int]]:
    """major:minor of every block device policyd holds an fd on."""
    return loops.block_fds(policyd_pid(stack))


def open_fd_count(stack: Stack) -> int:
    return loops.fd_count(policyd_pid(stack))


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
        [*as_user(uid), sys.executable, "-c", script],
        env={"DBUS_ADDRESS": address, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
