"""Unit tests without daemons: the bridge's line parser and reader, the VM-side helper's line,
and policyd's descriptor grammar. Hypothesis feeds the parsers arbitrary bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from hypothesis import given, settings
from hypothesis import strategies as st

from client import bridge, request_export
from client.bridge import BridgeError, parse_request, read_request
from policyd import errors
from policyd.requests.vmdevice import device_descriptor, request_options

ENV = {"QREXEC_REMOTE_DOMAIN": "sys-usb", "QREXEC_SERVICE_ARGUMENT": "work"}
GOOD = b"name=sda1 major=8 minor=1 diskseq=12345 size=4096 ro=1 desc=USB_stick\n"


def test_good_line() -> None:
    req = parse_request(GOOD, ENV)
    assert (req.source, req.target, req.name, req.major, req.minor) == ("sys-usb", "work",
                                                                         "sda1", 8, 1)  # fmt: skip
    assert (req.diskseq, req.size, req.device_read_only, req.read_only) == (12345, 4096, True, True)
    assert req.description == "USB_stick"


@settings(max_examples=500)
@given(st.binary(max_size=700))
def test_any_bytes_are_refused_cleanly_or_fully_valid(untrusted: bytes) -> None:
    try:
        req = parse_request(untrusted, ENV)
    except BridgeError as e:
        assert e.name == "InvalidArgument"
        assert str(e).isascii() and "\n" not in str(e)
        return
    assert bridge.NAME_RE.fullmatch(req.name) and bridge.DESC_RE.fullmatch(req.description)
    assert req.source == "sys-usb" and req.target == "work"


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*bridge.REQUIRED, *bridge.OPTIONAL, "source"]),
                       st.text(alphabet="0123456789abcxyz=-_.", max_size=12)))  # fmt: skip
def test_field_combinations(fields: dict[str, str]) -> None:
    line = " ".join(f"{k}={v}" for k, v in fields.items()).encode() + b"\n"
    try:
        req = parse_request(line, ENV)
    except BridgeError:
        return
    assert "source" not in fields and set(bridge.REQUIRED) <= set(fields)
    assert str(req.major) == fields["major"] and str(req.diskseq) == fields["diskseq"]


def test_reader_stops_at_the_bound() -> None:
    with pytest.raises(BridgeError, match="longer than 512"):
        read_request(io.BytesIO(b"a" * 10_000))
    assert read_request(io.BytesIO(GOOD)) == GOOD


def test_reader_gives_up_on_a_silent_vm() -> None:
    r, w = os.pipe()
    try:
        with (
            open(r, "rb", buffering=0, closefd=False) as stream,
            pytest.raises(BridgeError, match="no complete request"),
        ):
            read_request(stream, timeout_s=0.05)  # type: ignore[arg-type]
    finally:
        os.close(r)
        os.close(w)


def test_answers_are_single_printable_lines() -> None:
    assert bridge.one_line("a\nb\x1b[31m" + "x" * 1000) == "a?b?[31m" + "x" * 392
    assert bridge.answer_for({"State": "approved", "Devid": 51728, "BackendPath": "/x"}) == (
        "ok devid=51728 backend=/x"
    )
    assert bridge.answer_for({"State": "failed", "Error": "DeviceChanged"}).startswith(
        "error DeviceChanged "
    )


def fake_sysfs(root: Path, name: str, dev: str, diskseq: str, sectors: int, ro: int) -> None:
    base = root / "class" / "block" / name
    (base / "loop").mkdir(parents=True)
    for attr, value in {
        "dev": dev,
        "diskseq": diskseq,
        "size": str(sectors),
        "ro": str(ro),
    }.items():
        (base / attr).write_text(value + "\n")
    (base / "loop" / "backing_file").write_text("/home/user/my disk (1).img\n")


def test_helper_line_round_trips_through_the_bridge(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, "loop3", "7:3", "987", 2048, 0)
    device = request_export.read_device("loop3", str(tmp_path))
    assert device.description == "my_disk__1_.img"
    req = parse_request(device.line(read_write=True).encode(), ENV)
    assert (req.name, req.major, req.minor, req.diskseq) == ("loop3", 7, 3, 987)
    assert (req.size, req.device_read_only, req.read_only) == (2048 * 512, False, False)
    assert req.description == "my_disk__1_.img"


def test_helper_refuses_bad_names_and_missing_diskseq(tmp_path: Path) -> None:
    with pytest.raises(request_export.RequestError):
        request_export.device_name("/dev/../sda")
    assert request_export.device_name("/dev/sdb2") == "sdb2"
    fake_sysfs(tmp_path, "loop4", "7:4", "1", 8, 0)
    (tmp_path / "class/block/loop4/diskseq").unlink()
    with pytest.raises(request_export.RequestError, match="diskseq"):
        request_export.read_device("loop4", str(tmp_path))


def descriptor(**change: Variant) -> dict[str, Variant]:
    base = {
        "name": Variant("s", "loop0"),
        "major": Variant("u", 7),
        "minor": Variant("u", 0),
        "diskseq": Variant("t", 9),
        "size": Variant("t", 512),
        "read-only": Variant("b", False),
    }
    return {**base, **change}


def test_policyd_descriptor_grammar() -> None:
    assert device_descriptor(descriptor()).name == "loop0"
    for bad in (
        descriptor(name=Variant("s", "loop0\n")),
        descriptor(major=Variant("t", 7)),
        descriptor(description=Variant("s", "\u00e9")),
        {"name": Variant("s", "loop0")},
        "not a dict",
        {1: Variant("s", "x")},
    ):
        with pytest.raises(errors.InvalidArgument):
            device_descriptor(bad)
    ro = device_descriptor(descriptor(**{"read-only": Variant("b", True)}))
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        request_options({"read-only": Variant("b", False)}, ro, 300)
    assert request_options({}, ro, 300).expiry_s == 300


def _signal(sender: str, member: str, signature: str, body: list[object], path: str) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        sender=sender,
        path=path,
        interface="org.freedesktop.DBus" if sender == "org.freedesktop.DBus" else "x.y",
        member=member,
        signature=signature,
        body=body,
    )


def _owner_changed(old: str, new: str) -> Message:
    body: list[object] = [bridge.BUS_NAME, old, new]
    return _signal("org.freedesktop.DBus", "NameOwnerChanged", "sss", body, "/org/freedesktop/DBus")


def _state(sender: str, path: str, state: str) -> Message:
    body: list[object] = [bridge.REQUEST_IFACE, {"State": Variant("s", state)}, []]
    return _signal(sender, "PropertiesChanged", "sa{sv}as", body, path)


REQ = "/org/qubes/BlockBroker1/request/1"


def test_watcher_policyd_taking_the_name_is_not_a_loss() -> None:
    """D-Bus activation or a restart makes policyd *take* the name: not "lost"."""
    watcher = bridge.Watcher()
    watcher.on_message(_owner_changed("", ":1.7"))
    watcher.owner = ":1.7"
    assert watcher.final(REQ) is None
    watcher.on_message(_owner_changed(":1.7", ""))  # now it really goes away
    assert watcher.final(REQ) == {"State": "lost"}


def test_watcher_ignores_request_signals_from_others() -> None:
    """Anyone may send the bridge a unicast signal; only policyd's own unique name counts."""
    watcher = bridge.Watcher()
    watcher.on_message(_state(":1.99", REQ, "approved"))  # before the reply: kept per sender
    watcher.owner = ":1.7"
    assert watcher.final(REQ) is None
    watcher.on_message(_state(":1.99", REQ, "approved"))
    assert watcher.final(REQ) is None
    watcher.on_message(_state(":1.7", REQ, "denied"))
    assert watcher.final(REQ) == {"State": "denied"}


def test_watcher_owner_replaced_is_lost() -> None:
    watcher = bridge.Watcher()
    watcher.owner = ":1.7"
    watcher.on_message(_owner_changed(":1.7", ":1.9"))  # replaced: its requests are gone
    assert watcher.final(REQ) == {"State": "lost"}
