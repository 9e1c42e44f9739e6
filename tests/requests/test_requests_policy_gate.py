"""policyd consults the export policy for Export, ExportFd and Attach (dom0's own paths), and
the Request object's introspection matches dbus/org.qubes.BlockBroker1.Request.xml.

Runs as root with real daemons. The policy is the stack's copy (Stack.policy_dir); a test adds
a file there and removes it again (policyd re-reads the directory on each decision).
"""

from __future__ import annotations

import asyncio
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from harness.names import INTROSPECTABLE_IFACE, REQUEST_IFACE
from harness.rawbus import call as bus_call
from harness.rawbus import connect
from harness.stack import Stack
from reqlab import (
    Holder,
    audit_lines,
    bridge_gid,
    call,
    device_descriptor,
    publish,
    vm_loop,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

DBUS_DIR = Path(__file__).resolve().parents[2] / "dbus"


@pytest.fixture
def extra_rule(stack: Stack) -> Iterator[Path]:
    path = stack.policy_dir / "10-gate-test.policy"
    yield path
    path.unlink(missing_ok=True)


def write_policy(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def vbds(stack: Stack) -> list[str]:
    base = "/local/domain/0/backend/vbd"
    if not stack.xs_exists(base):
        return []
    return [f"{base}/{fe}/{d}" for fe in stack.xs_ls(base) for d in stack.xs_ls(f"{base}/{fe}")]


def test_export_denied_by_a_rule_names_it_and_leaves_nothing(
    stack: Stack, extra_rule: Path
) -> None:
    image = stack.make_image("gate-denied.img")
    write_policy(extra_rule, f"# gate test\nexport  file:{image}  dom0  work  deny\n")
    out = call(stack, "Export", "ssa{sv}", [str(image), "work", {}])
    assert out["error"] == "PolicyDenied", out
    assert f"{extra_rule}:2" in out["message"]
    assert vbds(stack) == [] and stack.leaked_loops() == []
    assert any("result=deny" in line and "operation=export" in line for line in audit_lines(stack))
    # the same image to another domain: no rule denies it, the default allows
    allowed = call(stack, "Export", "ssa{sv}", [str(image), "untrusted", {}])
    assert allowed["error"] is None, allowed
    assert call(stack, "Detach", path=allowed["body"][0],
                iface="org.qubes.BlockBroker1.Export")["error"] is None  # fmt: skip


def test_export_into_dom0_is_denied_by_the_catch_all(stack: Stack) -> None:
    image = stack.make_image("gate-dom0.img")
    out = call(stack, "Export", "ssa{sv}", [str(image), "Domain-0", {}])
    assert out["error"] == "PolicyDenied", out
    assert "50-test.policy:8" in out["message"] and "to dom0" in out["message"]
    assert stack.leaked_loops() == []


async def export_fd(address: str, fd: int) -> Message:
    bus = await connect(address)
    try:
        return await bus_call(bus, "ExportFd", "hsa{sv}", [0, "work", {}], fds=[fd])
    finally:
        bus.disconnect()


def test_export_fd_and_attach_are_gated(stack: Stack, extra_rule: Path, loop_dir: Path) -> None:
    write_policy(extra_rule, "export * dom0 work deny\nattach * dom0 work deny\n")
    image = stack.make_image("gate-fd.img")
    be = "/local/domain/0/backend/vbd/1/51712"
    for name, value in {"params": str(image), "mode": "r", "type": "phy",
                        "frontend-id": "1"}.items():  # fmt: skip
        stack.xs_write(f"{be}/{name}", value)
    try:
        out = call(stack, "Attach", "s", [be])
        assert out["error"] == "PolicyDenied" and f"{extra_rule}:2" in out["message"], out
        assert stack.xs_read(f"{be}/physical-device") is None
    finally:
        stack.xs_rm(be)
    assert stack.leaked_loops() == []
    with vm_loop(loop_dir, "gate-fd-dev.img") as dev:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            reply = asyncio.run(export_fd(stack.bus_address, fd))
        finally:
            os.close(fd)
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "org.qubes.BlockBroker1.Error.PolicyDenied", reply.body
        assert f"{extra_rule}:1" in reply.body[0] and dev.name in reply.body[0]
        assert vbds(stack) == []


def test_request_introspection_matches_the_xml(stack: Stack) -> None:
    publish(stack, 5, "loop6", "7:0", "66")
    holder = Holder(stack, ["sys-usb", device_descriptor("loop6", 66), "work", {}],
                    user=65534, groups=(bridge_gid(),))  # fmt: skip
    try:
        xml = call(stack, "Introspect", path=holder.path,
                   iface=INTROSPECTABLE_IFACE)["body"][0]  # fmt: skip
        live = ET.fromstring(xml).find(f"interface[@name='{REQUEST_IFACE}']")
        doc = ET.parse(DBUS_DIR / "org.qubes.BlockBroker1.Request.xml").getroot()
        documented = doc.find(f"interface[@name='{REQUEST_IFACE}']")
        assert live is not None and documented is not None

        def shape(iface: ET.Element) -> tuple[set[str | None], dict[str | None, str | None]]:
            methods = {m.get("name") for m in iface.findall("method")}
            props = {p.get("name"): p.get("type") for p in iface.findall("property")}
            return methods, props

        assert shape(live) == shape(documented)
    finally:
        holder.send("Withdraw")
        holder.close()
