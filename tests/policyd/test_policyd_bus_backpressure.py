"""policyd's bus connection (policyd.bus.connection): it survives a full socket buffer, and its
property signals name their path without a scan of every exported object.

Runs as root against the stack's real dbus-daemon. For the first, dbus-daemon is stopped
(SIGSTOP) while a connection sends more than the socket buffer holds, then resumed: every message
must arrive and the connection stay up. dbus-fast 5.2's own writer ends the connection there
(checked by hand with dbus_fast.aio.MessageBus in place of PolicydBus: the sends after the first
EAGAIN fail with EBADF; not kept as a test, because the interpreter trips over it later: "AST
constructor recursion depth mismatch" in the next import).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from harness.names import (
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    EXPORT_IFACE,
    MANAGER,
    MANAGER_IFACE,
    PROPS_IFACE,
)
from harness.stack import Stack

from policyd.brokerclient import Identity
from policyd.bus.connection import PolicydBus
from policyd.bus.objects import BusObjects
from policyd.exports.registry import Backing, ExportRecord

pytestmark = [pytest.mark.root, pytest.mark.daemon]

SIGNALS = 64
PAYLOAD = "x" * 60_000  # 64 of these are ~4 MB, far above a unix socket's send buffer


async def burst(bus: MessageBus, dbus_pid: int) -> tuple[int, bool]:
    """Send SIGNALS large signals with dbus-daemon stopped, resume it; returns how many sends
    completed and whether the connection still answers a call."""
    os.kill(dbus_pid, signal.SIGSTOP)
    try:
        sent = []
        for _ in range(SIGNALS):
            signal_msg = Message.new_signal("/test", "org.example.Test", "Big", "s", [PAYLOAD])
            try:
                sent.append(bus.send(signal_msg))
            except OSError:  # the writer closed the socket: EBADF on the next send
                break
        await asyncio.sleep(0.2)
    finally:
        os.kill(dbus_pid, signal.SIGCONT)
    results = await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 10)
    done = sum(1 for r in results if not isinstance(r, BaseException))
    if not bus.connected:
        return done, False
    reply = await asyncio.wait_for(
        bus.call(
            Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_IFACE, member="GetId")
        ),
        10,
    )
    return done, reply is not None and reply.message_type is MessageType.METHOD_RETURN


def run(stack: Stack, bus_class: type[MessageBus]) -> tuple[int, bool]:
    async def main() -> tuple[int, bool]:
        bus = await bus_class(bus_address=stack.bus_address).connect()
        try:
            return await burst(bus, stack.daemons["dbus"].pid)
        finally:
            bus.disconnect()

    return asyncio.run(main())


def test_a_full_socket_buffer_waits(stack: Stack) -> None:
    assert run(stack, PolicydBus) == (SIGNALS, True)


def test_property_signals_name_their_path_without_a_scan(stack: Stack) -> None:
    """PolicydBus sends a PropertiesChanged from the path its interface knows (the Manager's,
    an export's), not by scanning every exported object as dbus-fast does; the signal is the
    same as dbus-fast's."""

    async def main() -> list[Message]:
        bus = await PolicydBus(bus_address=stack.bus_address).connect()
        sent: list[Message] = []
        try:
            objects = BusObjects(bus, "test")
            objects.start()
            backing = Backing(("file", 1, 2), -1, Identity(7, 3, 4, 1, 2, 0), "file", False)
            record = ExportRecord(5, "/x.img", backing, 0, "dom0", 1, "work", 51712,
                                  "/local/domain/0/backend/vbd/1/51712", "r", 0, True)  # fmt: skip
            objects.export_added(record)
            bus.send = sent.append  # type: ignore[method-assign,assignment]
            scans = 0
            original = MessageBus._interface_signal_notify

            def counting(*args: object) -> None:
                nonlocal scans
                scans += 1

            MessageBus._interface_signal_notify = counting  # type: ignore[method-assign]
            try:
                objects.export_count_changed(1)
                record.state = "connected"
                objects.export_changed(record, ["State"])
            finally:
                MessageBus._interface_signal_notify = original  # type: ignore[method-assign]
            assert scans == 0
        finally:
            bus.disconnect()
        return sent

    sent = asyncio.run(main())
    assert [(m.path, m.interface, m.member, m.body[0]) for m in sent] == [
        (MANAGER, PROPS_IFACE, "PropertiesChanged", MANAGER_IFACE),
        ("/org/qubes/BlockBroker1/export/5", PROPS_IFACE, "PropertiesChanged", EXPORT_IFACE),
    ]


def test_dbus_fast_is_the_pinned_version() -> None:
    """PolicydBus subclasses dbus-fast's private writer and overrides two private handlers, so
    pyproject.toml pins dbus-fast exactly; the installed one must be that version (a newer one
    needs the overrides re-read against its source, then the pin moved)."""
    import re
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pins = [d for d in project["project"]["dependencies"] if d.startswith("dbus-fast")]
    assert len(pins) == 1 and re.fullmatch(r"dbus-fast==[\d.]+", pins[0]), pins
    assert version("dbus-fast") == pins[0].split("==")[1]
