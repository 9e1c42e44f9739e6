"""Unit: export requests (VM-supplied text stays harmless), and the watch state machine."""

from __future__ import annotations

import io
import json
from typing import Any, cast

import pytest

from client import cli, output
from client.api import AsyncClient, request_path
from client.errors import UsageError
from client.model import Event, RequestInfo, printable
from client.watch import Subscription

REQ = "/org/qubes/BlockBroker1/request/4"
HOSTILE = "\x1b]0;pwned\x07\x1b[2Jrm -rf /\n" + "A" * 200
PROPS: dict[str, Any] = {
    "Id": 4,
    "Source": "sys-usb",
    "Target": "work",
    "DeviceName": "sda",
    "Major": 8,
    "Minor": 0,
    "Diskseq": 77,
    "Size": 1 << 30,
    "Mode": "r",
    "DeviceReadOnly": False,
    "Description": HOSTILE,
    "Created": 1_700_000_000_000_000,
    "Expires": 1_700_000_060_000_000,
    "State": "pending",
    "Rule": "/etc/blockbroker/policy.d/50-usb.policy:3",
    "Export": "",
    "BackendPath": "",
    "Devid": 0,
    "Error": "",
}


def test_request_from_properties_and_updated() -> None:
    req = RequestInfo.from_properties(REQ, PROPS)
    assert (req.id, req.number, req.source, req.diskseq) == ("4", 4, "sys-usb", 77)
    export = "/org/qubes/BlockBroker1/export/9"
    approved = req.updated({"State": "approved", "Devid": 51712, "Export": export})
    assert (approved.state, approved.devid, approved.diskseq) == ("approved", 51712, 77)
    assert approved.export == export
    assert req.state == "pending"


def test_printable_strips_control_characters_and_bounds_length() -> None:
    shown = printable(HOSTILE)
    assert len(shown) == 64
    assert all(" " <= c <= "~" for c in shown)
    assert "\x1b" not in shown


def test_request_table_never_prints_vm_control_characters() -> None:
    out = io.StringIO()
    output.print_requests([RequestInfo.from_properties(REQ, PROPS)], False, out)
    text = out.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert text.count("\n") == 2  # header + one row: the VM's newline did not split it
    assert "pending" in text


def test_request_json_keeps_the_text_escaped() -> None:
    out = io.StringIO()
    output.print_requests([RequestInfo.from_properties(REQ, PROPS)], True, out)
    line = out.getvalue()
    assert "\x1b" not in line  # JSON escapes it
    obj = json.loads(line)
    assert obj["description"] == HOSTILE
    assert obj["request"] == REQ
    assert obj["id"] == "4"


@pytest.mark.parametrize("target", ["x", "", "/org/qubes/BlockBroker1/export/1"])
def test_request_path_rejects(target: str) -> None:
    with pytest.raises(UsageError):
        request_path(target)


def test_request_path() -> None:
    assert request_path("4") == REQ
    assert request_path(REQ) == REQ


@pytest.mark.parametrize("argv", [["approve"], ["approve", "x"], ["deny", "/etc/passwd"]])
def test_approve_deny_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_subscription_state_machine() -> None:
    """Signals already decoded: added, changed, removed for exports and requests."""
    events: list[Event] = []
    sub = Subscription(cast(AsyncClient, None), events.append)
    export = "/org/qubes/BlockBroker1/export/1"
    sub._added(export, {"org.qubes.BlockBroker1.Export": {"Diskseq": 9, "State": "x"}})
    sub._changed(export, "org.qubes.BlockBroker1.Export", {"State": "connected"})
    sub._added(REQ, {"org.qubes.BlockBroker1.Request": PROPS})
    sub._changed(REQ, "org.qubes.BlockBroker1.Request", {"State": "approved"})
    sub._changed("/org/qubes/BlockBroker1", "org.qubes.BlockBroker1.Manager", {"ExportCount": 1})
    assert sub.exports[export].state == "connected"
    assert sub.exports[export].diskseq == 9
    assert sub.requests[REQ].state == "approved"
    sub._removed(REQ, ["org.qubes.BlockBroker1.Request"])
    sub._removed(export, ["org.qubes.BlockBroker1.Export"])
    assert [e.kind for e in events] == [
        "added", "changed", "request-added", "request-changed", "status", "request-removed",
        "removed",
    ]  # fmt: skip
    assert events[-1].export is not None and events[-1].export.state == "connected"
    assert sub.exports == {} and sub.requests == {}
    assert events[4].status is not None and events[4].status.export_count == 1
