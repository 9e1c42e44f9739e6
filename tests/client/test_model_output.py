"""Unit: properties -> dataclasses, and the CLI's table and JSON output."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from client import output
from client.api import export_options, export_path
from client.errors import UsageError
from client.model import Event, ExportInfo, Status

PROPS: dict[str, Any] = {
    "Source": "/srv/images/a.img",
    "SourceKind": "file",
    "BackendDomain": "Domain-0",
    "BackendDomid": 0,
    "FrontendDomain": "work",
    "FrontendDomid": 1,
    "Devid": 51712,
    "BackendPath": "/local/domain/0/backend/vbd/1/51712",
    "LoopDevice": "/dev/loop3",
    "Major": 7,
    "Minor": 3,
    "Diskseq": 1234,
    "DmName": "qubes_dom0-vm--work--private",
    "DmUuid": "LVM-" + "a" * 64,
    "Mode": "r",
    "State": "waiting-for-blkback",
    "Since": 1_700_000_000_000_000,
}
PATH = "/org/qubes/BlockBroker1/export/7"


def test_export_from_properties() -> None:
    info = ExportInfo.from_properties(PATH, PROPS)
    assert info.id == "7"
    assert (info.loop_device, info.major, info.minor, info.diskseq) == ("/dev/loop3", 7, 3, 1234)
    assert info.to_properties() == PROPS


def test_missing_or_mistyped_properties_get_neutral_defaults() -> None:
    info = ExportInfo.from_properties(PATH, {"Major": "seven", "Mode": "w"})
    assert info.major == 0
    assert info.mode == "w"
    assert info.loop_device == ""


def test_updated_applies_changes_only() -> None:
    info = ExportInfo.from_properties(PATH, PROPS)
    new = info.updated({"State": "connected"})
    assert new.state == "connected"
    assert new.diskseq == info.diskseq
    assert info.state == "waiting-for-blkback"


def test_json_fields() -> None:
    out = io.StringIO()
    info = ExportInfo.from_properties(PATH, PROPS)
    output.print_exports([info, info], True, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    obj = json.loads(lines[0])
    required = {"export", "loop_device", "major", "minor", "diskseq", "backend_path", "mode"}
    assert required <= obj.keys()
    assert obj["export"] == PATH
    assert obj["id"] == "7"
    assert obj["diskseq"] == 1234
    assert obj["frontend_domain"] == "work"


def test_table_output() -> None:
    out = io.StringIO()
    output.print_exports([ExportInfo.from_properties(PATH, PROPS)], False, out)
    header, row = out.getvalue().splitlines()
    assert header.split() == list(output.EXPORT_COLUMNS)
    assert row.split() == [
        "7", "work", "51712", "r", "waiting-for-blkback", "/dev/loop3", "7:3", "0x4d2",
        "/srv/images/a.img",
    ]  # fmt: skip


def test_empty_list_human_and_json() -> None:
    out = io.StringIO()
    output.print_exports([], False, out)
    assert out.getvalue() == "no exports\n"
    out = io.StringIO()
    output.print_exports([], True, out)
    assert out.getvalue() == ""


def test_status_json_and_human() -> None:
    status = Status.from_properties(
        {"Version": "0.1.0", "ExportCount": 2, "BrokerConnected": True, "XenStoreConnected": False}
    )
    out = io.StringIO()
    output.print_status(status, True, out)
    assert json.loads(out.getvalue()) == {
        "version": "0.1.0",
        "export_count": 2,
        "broker_connected": True,
        "xenstore_connected": False,
    }
    out = io.StringIO()
    output.print_status(status, False, out)
    assert "xenstore connected  NO" in out.getvalue()
    assert status.updated({"XenStoreConnected": True}).xenstore_connected


def test_event_json() -> None:
    info = ExportInfo.from_properties(PATH, PROPS)
    obj = output.event_json(Event("changed", path=PATH, export=info, changed={"State": "x"}))
    assert obj["event"] == "changed"
    assert obj["changed"] == ["State"]
    assert obj["loop_device"] == "/dev/loop3"
    assert obj["diskseq"] == 1234  # JSON keeps the number; people see it in hex


def test_event_and_detail_human_show_diskseq_in_hex() -> None:
    info = ExportInfo.from_properties(PATH, PROPS)
    out = io.StringIO()
    output.print_event(Event("changed", path=PATH, export=info, changed={"State": "x"}), False, out)
    assert (
        out.getvalue()
        == "changed 7 waiting-for-blkback /dev/loop3 7:3 diskseq=0x4d2 -> work (State)\n"
    )
    out = io.StringIO()
    output.print_export_detail(info, False, out)
    assert "diskseq       0x4d2\n" in out.getvalue()


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("3", "/org/qubes/BlockBroker1/export/3"),
        ("007", "/org/qubes/BlockBroker1/export/7"),
        (PATH, PATH),
    ],
)
def test_export_path(target: str, path: str) -> None:
    assert export_path(target) == path


@pytest.mark.parametrize(
    "target",
    [
        "",
        "x",
        "-1",
        "/org/qubes/Other/1",
        "٣",
        "/org/qubes/BlockBroker1/export/",
        "/org/qubes/BlockBroker1/export/../1",
        "/org/qubes/BlockBroker1/export/1/",
    ],
)
def test_export_path_rejects(target: str) -> None:
    with pytest.raises(UsageError, match="not an export"):
        export_path(target)


def test_export_options() -> None:
    opts = export_options(read_only=False, devid=5, direct_io=True)
    assert {k: (v.signature, v.value) for k, v in opts.items()} == {
        "read-only": ("b", False),
        "devid": ("u", 5),
        "direct-io": ("b", True),
    }
    assert set(export_options()) == {"read-only"}
    with pytest.raises(UsageError, match="out of range"):
        export_options(devid=1 << 32)
