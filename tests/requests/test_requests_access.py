"""Who may do what with export requests, decided by the real polkitd and policyd's checks.

Approve/Deny: polkit (org.qubes.blockbroker.approve); the subjects are non-root uids, since
polkit always authorizes uid 0. RequestExport/Withdraw: root and group blockbroker-qrexec;
Withdraw only by the connection that made the request. Runs as root with real daemons.
"""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Variant
from harness.names import REQUEST_IFACE
from harness.rawbus import call as bus_call
from harness.rawbus import connect
from harness.stack import Stack
from reqlab import (
    NOBODY,
    REFUSED_USER,
    UNRULED_USER,
    Holder,
    audit_lines,
    bridge_gid,
    call,
    detach_export,
    device_descriptor,
    managed_exports,
    managed_requests,
    publish,
    vm_backends,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def request_body(name: str, diskseq: int, **options: list[object]) -> list[object]:
    return ["sys-usb", device_descriptor(name, diskseq), "work", options]


@pytest.fixture
def published(stack: Stack) -> str:
    publish(stack, 5, "loop9", "7:0", "4242")
    return "loop9"


@pytest.mark.parametrize("user", [REFUSED_USER, UNRULED_USER])
@pytest.mark.parametrize("member", ["Approve", "Deny"])
def test_approver_without_a_yes_rule_is_refused(
    stack: Stack, published: str, user: str, member: str
) -> None:
    holder = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    try:
        refused = call(stack, member, path=holder.path, iface=REQUEST_IFACE, user=user)
        assert refused["error"] == "AccessDenied", refused
        assert "org.qubes.blockbroker.approve" in refused["message"]
        assert managed_requests(stack)[holder.path]["State"] == "pending"  # untouched
        assert vm_backends(stack, 5) == []
    finally:
        assert holder.send("Withdraw")["error"] is None
        holder.close()


def test_request_export_needs_root_or_the_bridge_group(stack: Stack, published: str) -> None:
    outsider = Holder(stack, request_body(published, 4242), user=NOBODY)  # no bridge group
    assert outsider.first["error"] == "AccessDenied", outsider.first
    outsider.close()
    assert managed_requests(stack) == {}


def test_only_the_requester_or_root_withdraws(stack: Stack, published: str) -> None:
    holder = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    other = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    try:
        # another bridge connection (another VM's call) cannot withdraw holder's request
        stolen = call(stack, "Withdraw", path=holder.path, iface=REQUEST_IFACE, user=NOBODY,
                      groups=(bridge_gid(),))  # fmt: skip
        assert stolen["error"] == "AccessDenied", stolen
        assert holder.send("Withdraw")["error"] is None
        assert holder.path not in managed_requests(stack)
        again = call(stack, "Approve", path=holder.path, iface=REQUEST_IFACE, user=NOBODY)
        assert again["error"] == "NotFound" and "withdrawn" in again["message"]
        assert call(stack, "Withdraw", path=other.path, iface=REQUEST_IFACE)["error"] is None
        assert managed_requests(stack) == {}
        assert vm_backends(stack, 5) == []
    finally:
        holder.close()
        other.close()


def test_requester_disconnecting_withdraws(stack: Stack, published: str) -> None:
    holder = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    path = holder.path
    assert path in managed_requests(stack)
    holder.close()  # the VM's qrexec call ended: the bridge is gone
    wait_for(lambda: True if path not in managed_requests(stack) else None, "the withdrawal")
    assert any("requester disconnected" in line for line in audit_lines(stack) if path in line)


def test_pending_requests_are_audited_when_policyd_stops(stack: Stack, published: str) -> None:
    holder = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    try:
        path = holder.path
        assert stack.stop_policyd() == []
        ended = [line for line in audit_lines(stack) if path in line]
        assert len(ended) == 1 and "result=withdrawn" in ended[0]
        assert 'decided_by="policyd stopping"' in ended[0]
    finally:
        holder.close()
        stack.start_policyd()


def test_expired_request_is_removed_and_cannot_be_approved(stack: Stack, published: str) -> None:
    holder = Holder(stack, request_body(published, 4242, timeout=["u", 1]), user=NOBODY,
                    groups=(bridge_gid(),))  # fmt: skip
    try:
        path = holder.path
        wait_for(lambda: True if path not in managed_requests(stack) else None, "the expiry")
        late = call(stack, "Approve", path=path, iface=REQUEST_IFACE, user=NOBODY)
        assert late["error"] == "Expired", late
        assert vm_backends(stack, 5) == []
        assert any("result=expired" in line for line in audit_lines(stack) if path in line)
        assert holder.send("Withdraw")["error"] == "Expired"
    finally:
        holder.close()


async def flood(address: str, count: int) -> list[str | None]:
    """`count` requests on one connection (root, like one bridge); their error names."""
    bus = await connect(address)
    errors: list[str | None] = []
    try:
        for _ in range(count):
            body = request_body("loop9", 4242)
            body[1] = {k: Variant(*v) for k, v in body[1].items()}  # type: ignore[union-attr]
            reply = await bus_call(bus, "RequestExport", "sa{sv}sa{sv}", body)
            errors.append(reply.error_name)
    finally:
        bus.disconnect()
    return errors


def test_one_vm_cannot_flood_the_pending_requests(stack: Stack, published: str) -> None:
    errors = asyncio.run(flood(stack.bus_address, 17))
    assert errors[:16] == [None] * 16
    assert errors[16] == "org.qubes.BlockBroker1.Error.Busy"
    # the connection is gone: all its requests are withdrawn
    wait_for(lambda: True if managed_requests(stack) == {} else None, "the withdrawals")


def test_polkit_rules_see_the_requests_details(stack: Stack, published: str) -> None:
    publish(stack, 5, "loop5", "7:0", "55")
    other = Holder(stack, request_body(published, 4242), user=NOBODY, groups=(bridge_gid(),))
    wanted = Holder(stack, request_body("loop5", 55), user=NOBODY, groups=(bridge_gid(),))
    try:
        refused = call(stack, "Approve", path=other.path, iface=REQUEST_IFACE, user="games")
        assert refused["error"] == "AccessDenied", refused
        assert any("result=refused" in line and "device=loop9" in line and "uid=5 " in line
                   for line in audit_lines(stack))  # fmt: skip
        done = call(stack, "Approve", path=wanted.path, iface=REQUEST_IFACE, user="games")
        assert done["error"] is None, done
        (backend,) = vm_backends(stack, 5)
        assert stack.xs_read(f"{backend}/diskseq") == f"{55:x}"
        (export,) = managed_exports(stack)
        detach_export(stack, export)
        assert vm_backends(stack, 5) == []
    finally:
        other.send("Withdraw")
        other.close()
        wanted.close()
