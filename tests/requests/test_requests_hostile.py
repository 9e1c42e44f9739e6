"""Hostile input: payloads a VM sends to the qrexec bridge, and bad RequestExport arguments.

Every one gets a clear, named answer; no request object is created and nothing is written to
XenStore. Runs as root with real daemons; the bridge runs as uid 65534 + group
blockbroker-qrexec, as qrexec would run it.
"""

from __future__ import annotations

import pytest
from harness.stack import Stack
from reqlab import (
    audit_lines,
    call,
    device_descriptor,
    frontends,
    managed_requests,
    policyd_lines,
    publish,
    run_bridge,
    vm_backends,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

GOOD = b"name=loop7 major=7 minor=7 diskseq=77 size=1048576 ro=0 desc=backing.img"

HOSTILE_LINES = [
    pytest.param(b"name=loop7 " + b"x" * 600 + b"\n", "longer than 512", id="oversized"),
    pytest.param(GOOD + b" " + b"desc=" + b"a" * 520, "longer than 512", id="oversized-no-nl"),
    pytest.param(
        GOOD.replace(b"backing", "bäcking".encode()) + b"\n", "printable ASCII", id="non-ascii"
    ),
    pytest.param(
        GOOD + b"\nname=sda major=8 minor=0 diskseq=1 size=1 ro=0\n",
        "one line",
        id="injected-newline",
    ),
    pytest.param(GOOD.replace(b" ro=0", b"\rro=0") + b"\n", "printable ASCII", id="cr"),
    pytest.param(GOOD + b"\x00\n", "printable ASCII", id="nul"),
    pytest.param(b"\n", "fields are key=value", id="empty-line"),
    pytest.param(b"", "empty request", id="nothing"),
    pytest.param(GOOD.replace(b"major=7", b"major=-7") + b"\n", "major must", id="negative"),
    pytest.param(GOOD.replace(b"major=7", b"major=0x7") + b"\n", "major must", id="hex"),
    pytest.param(GOOD.replace(b"major=7", b"major=07") + b"\n", "major must", id="leading-0"),
    pytest.param(
        GOOD.replace(b"diskseq=77", b"diskseq=" + b"9" * 21) + b"\n", "diskseq must", id="huge"
    ),
    pytest.param(
        GOOD.replace(b"minor=7", b"minor=4294967296") + b"\n", "minor must", id="u32-overflow"
    ),
    pytest.param(GOOD.replace(b"name=loop7", b"name=../sda") + b"\n", "name must", id="path"),
    pytest.param(GOOD.replace(b"name=loop7", b"name=Loop7") + b"\n", "name must", id="upper"),
    pytest.param(GOOD.replace(b"ro=0", b"ro=yes") + b"\n", "ro must", id="ro-word"),
    pytest.param(GOOD + b" source=sys-net\n", "comes from qrexec", id="source-in-payload"),
    pytest.param(GOOD + b" target=dom0\n", "comes from qrexec", id="target-in-payload"),
    pytest.param(GOOD + b" name=loop8\n", "given twice", id="duplicate"),
    pytest.param(GOOD + b" evil=1\n", "unknown field", id="unknown"),
    pytest.param(GOOD.replace(b" size", b"  size") + b"\n", "key=value", id="double-space"),
    pytest.param(GOOD.replace(b" size=1048576", b"") + b"\n", "missing fields", id="missing"),
    pytest.param(
        GOOD.replace(b"desc=backing.img", b"desc=a;rm${IFS}-rf") + b"\n",
        "desc must",
        id="desc-shell",
    ),
    pytest.param(GOOD + b" mode=rwx\n", "mode must", id="mode"),
]


@pytest.mark.parametrize(("line", "why"), HOSTILE_LINES)
def test_bridge_refuses_hostile_payloads(stack: Stack, line: bytes, why: str) -> None:
    publish(stack, 5, "loop7", "7:7", "77")
    before = policyd_lines(stack)
    result = run_bridge(stack, line)
    assert result.returncode == 1
    answer = result.stdout
    assert answer.startswith("error InvalidArgument ") and why in answer, answer
    assert answer.count("\n") == 1 and len(answer) <= 402 and answer.isascii()
    assert policyd_lines(stack) == before  # policyd was not even asked
    assert managed_requests(stack) == {}
    assert vm_backends(stack, 5) == [] and frontends(stack, 1) == []


@pytest.mark.parametrize(
    ("source", "target", "why"),
    [
        (None, "work", "QREXEC_REMOTE_DOMAIN"),
        ("sys usb", "work", "QREXEC_REMOTE_DOMAIN"),
        ("sys-usb", None, "service argument"),
        ("sys-usb", "work/../dom0", "service argument"),
    ],
)
def test_bridge_needs_qrexecs_environment(
    stack: Stack, source: str | None, target: str | None, why: str
) -> None:
    result = run_bridge(stack, GOOD + b"\n", source=source, target=target)
    assert result.returncode == 1 and result.stdout.startswith("error InvalidArgument ")
    assert why in result.stdout
    assert managed_requests(stack) == {} and vm_backends(stack, 5) == []


@pytest.mark.parametrize(
    ("source", "target", "answer"),
    [
        ("sys-net", "work", "denied "),  # a policy rule denies sys-net
        ("sys-usb", "dom0", "error UnknownDomain "),  # qrexec's dom0 is no XenStore domain name
        ("sys-usb", "Domain-0", "denied "),  # a VM's device never goes to dom0 (built in)
        ("sys-usb", "sys-usb", "error InvalidArgument "),  # to itself
        ("nosuchvm", "work", "error UnknownDomain "),
    ],
)
def test_bridge_passes_policyd_refusals_on(
    stack: Stack, source: str, target: str, answer: str
) -> None:
    publish(stack, 5, "loop7", "7:7", "77")
    result = run_bridge(stack, GOOD + b"\n", source=source, target=target)
    assert result.returncode == 1 and result.stdout.startswith(answer), result.stdout
    assert managed_requests(stack) == {} and vm_backends(stack, 5) == []


def test_policy_deny_names_the_rule(stack: Stack) -> None:
    result = run_bridge(stack, GOOD + b"\n", source="sys-net", target="work")
    assert f"{stack.policy_dir}/50-test.policy:2" in result.stdout, result.stdout
    assert any("result=deny" in line and "source=sys-net" in line for line in audit_lines(stack))


def test_unpublished_device_is_refused(stack: Stack) -> None:
    if stack.xs_exists("/local/domain/5/data/blockbroker"):
        stack.xs_rm("/local/domain/5/data/blockbroker")
    result = run_bridge(stack, GOOD + b"\n")
    assert result.stdout.startswith("error DeviceChanged "), result.stdout
    assert "no longer publishes" in result.stdout
    assert managed_requests(stack) == {} and vm_backends(stack, 5) == []


BAD_DESCRIPTORS = [
    ({"name": ["s", "sda/1"]}, "device name"),
    ({"name": ["s", "a" * 17]}, "device name"),
    ({"major": ["u", 0]}, "major"),
    ({"major": ["u", 4096]}, "major"),
    ({"minor": ["u", 1 << 20]}, "minor"),
    ({"diskseq": ["t", 0]}, "diskseq"),
    ({"size": ["t", 0]}, "size"),
    ({"description": ["s", "x" * 65]}, "description"),
    ({"description": ["s", "line\nbreak"]}, "description"),
    ({"description": ["s", "\u202eevil"]}, "description"),
    ({"major": ["s", "7"]}, "type"),
    ({"extra": ["s", "x"]}, "unknown device field"),
]


@pytest.mark.parametrize(("change", "why"), BAD_DESCRIPTORS)
def test_request_export_validates_the_descriptor(
    stack: Stack, change: dict[str, list[object]], why: str
) -> None:
    device = {**device_descriptor("loop7", 77, minor=7), **change}
    out = call(stack, "RequestExport", "sa{sv}sa{sv}", ["sys-usb", device, "work", {}])
    assert out["error"] == "InvalidArgument" and why in out["message"], out
    assert managed_requests(stack) == {} and vm_backends(stack, 5) == []


def test_request_export_missing_fields_and_bad_options(stack: Stack) -> None:
    device = device_descriptor("loop7", 77, minor=7)
    del device["diskseq"]
    out = call(stack, "RequestExport", "sa{sv}sa{sv}", ["sys-usb", device, "work", {}])
    assert out["error"] == "InvalidArgument" and "missing" in out["message"]
    ro_device = {**device_descriptor("loop7", 77, minor=7), "read-only": ["b", True]}
    for options, why in [
        ({"read-only": ["b", False]}, "read-only"),
        ({"timeout": ["u", 0]}, "timeout"),
        ({"timeout": ["u", 100000]}, "timeout"),
        ({"devid": ["u", 51728]}, "unknown option"),
    ]:
        out = call(stack, "RequestExport", "sa{sv}sa{sv}", ["sys-usb", ro_device, "work", options])
        assert out["error"] == "InvalidArgument" and why in out["message"], (options, out)
    assert managed_requests(stack) == {} and vm_backends(stack, 5) == []
