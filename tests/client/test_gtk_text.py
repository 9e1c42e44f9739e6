"""What blockbroker-gtk's rows say (client.gtk.text): no display, no gi, no daemon."""

from __future__ import annotations

from client.errors import BlockBrokerError, DeviceChanged
from client.gtk import command
from client.gtk.text import (
    error_text,
    export_detail,
    request_detail,
    request_title,
    size_text,
    time_left,
)
from client.model import ExportInfo, RequestInfo


def test_sizes_and_time_left() -> None:
    assert size_text(0) == "size unknown"
    assert size_text(512) == "512 bytes"
    assert size_text(1 << 20) == "1.0 MiB"
    assert size_text(15 * (1 << 29)) == "7.5 GiB"
    assert time_left(0) == "no time limit"
    assert time_left(int(1000.0e6), now=701.0) == "4:59 left"
    assert time_left(int(1000.0e6), now=1000.0) == "expired"


def test_a_vm_cannot_fake_the_text_around_its_claims() -> None:
    req = RequestInfo(
        "/org/qubes/BlockBroker1/request/3",
        source="sys-usb",
        target="work",
        device_name="sdb\n\u202eevil",
        description="x' to dom0 \u200b<b>ok</b>\n" + "A" * 500,
        size=1 << 30,
        mode="r",
        diskseq=42,
        state="pending",
    )
    title, detail = request_title(req), request_detail(req, now=0.0)
    assert title == "sys-usb asks to give its device 'sdb??evil' to work"
    assert "\n" not in detail and "\u200b" not in detail and len(detail) < 200
    assert detail.startswith("claimed: 'x' to dom0 ?<b>ok</b>?AAA")
    assert "1.0 GiB · read-only · diskseq 0x2a · request 3 · no time limit" in detail


def test_export_rows_show_the_diskseq_in_hex() -> None:
    exp = ExportInfo(
        "/org/qubes/BlockBroker1/export/5",
        source="sys-usb:/dev/sdb",
        backend_domain="sys-usb",
        frontend_domain="work",
        mode="r",
        diskseq=0x3C305,
        state="backend-in-vm",
    )
    assert export_detail(exp).startswith(
        "from sys-usb · read-only · diskseq 0x3c305 · blkback in the source VM · since"
    )


def test_errors_carry_the_api_name() -> None:
    assert error_text(DeviceChanged("nothing was written")) == "DeviceChanged: nothing was written"
    other = BlockBrokerError("odd", "org.example.Error.Odd")
    assert error_text(other) == "org.example.Error.Odd: odd"


def test_launcher_runs_the_system_python_with_the_venv_appended() -> None:
    argv = command(["--address", "unix:path=/x"])
    assert argv[1:3] == ["-I", "-c"] and "sys.path.append" in argv[3]
    assert argv[4].endswith("site-packages") and argv[5:] == ["--address", "unix:path=/x"]
