"""Writes the fuzzers' seed inputs into tests/fuzz/corpus/<target>/ (test tooling, no I/O but
those files). Seeds are well-formed examples that start each fuzzer deep in its parser; the
structured targets (dbus_args, xs_values, xs_wire) read their input through FuzzedDataProvider,
so for them a few arbitrary byte strings do as well. Re-run after a format change:

    PREFIX/venv/bin/python tests/fuzz/seeds.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dbus_fast import Message, MessageType
from pyxs._internal import Op, Packet

from broker import protocol
from policyd import brokerclient

CORPUS = Path(__file__).resolve().parent / "corpus"
R, F = protocol.RequestKind, protocol.RequestFlag


def dbus(message: Message) -> bytes:
    return bytes(message._marshall(False))


def seeds() -> dict[str, list[bytes]]:
    requests = [
        protocol.Request(R.OPEN_BLOCK, F.WRITABLE, path=b"/dev/loop0"),
        protocol.Request(R.OPEN_BLOCK, F.EXPECT_DEV | F.EXPECT_DISKSEQ, 0, 7, 3, 42, b"/dev/sda"),
        protocol.Request(R.LOOP_FILE, F.DIRECT_IO, 4096, path=b"/srv/images/a.img"),
        protocol.Request(R.IDENTIFY),
    ]
    replies = [
        protocol.Reply(protocol.ReplyKind.OK, major=7, minor=1, diskseq=9, size=1 << 20),
        protocol.Reply(
            protocol.ReplyKind.ERROR, protocol.ErrorCode.OUTSIDE_ROOTS, 13, message="no"
        ),
    ]
    auth = b"OK 0123456789abcdef0123456789abcdef\r\n"
    hello = Message(
        message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="s", body=[":1.5"],
        destination=":1.5", sender="org.freedesktop.DBus", serial=1,
    )  # fmt: skip
    ok = Message(message_type=MessageType.METHOD_RETURN, reply_serial=2, serial=7)
    error = Message(
        message_type=MessageType.ERROR, reply_serial=2, error_name="org.qubes.BlockBroker1."
        "Error.PolicyDenied", signature="s", body=["denied by policy"], serial=8,
    )  # fmt: skip
    signal = Message(
        message_type=MessageType.SIGNAL, path="/org/freedesktop/DBus", member="NameAcquired",
        interface="org.freedesktop.DBus", signature="s", body=[":1.5"], serial=2,
    )  # fmt: skip
    watch = b"/local/domain/3/name\x00policyd\x00"
    return {
        "frame": [brokerclient.encode_request(r) for r in requests]
        + [protocol.encode_reply(r) for r in replies],
        "policy": [
            b"# comment\nrequest-export  sd*  sys-usb  @tag:work  ask  mode=ro"
            b" default_target=work\n",
            b"attach file:/srv/images/* dom0 @anyvm allow mode=rw\nexport loop0 dom0 work deny\n",
            b"sys-usb usb-source trusted-exporter\nwork storage-target\n",
        ],
        "bridge": [
            b"name=loop0 major=7 minor=0 diskseq=42 size=1048576 ro=1\n",
            b"name=sda1 major=8 minor=1 diskseq=3 size=512 ro=0 mode=rw desc=backing.img\n",
        ],
        "dbus_args": [bytes(range(64)), b"\x01" * 64, b"\xff" * 64],
        "xs_values": [b"0 export 1" * 4, bytes(range(48)), b"\x01\x07" * 32],
        "xs_wire": [
            b"\x01\x00\x00" + Packet._struct.pack(Op.READ, 1, 0, 5) + b"value",
            b"\x00\x00\x00" + Packet._struct.pack(Op.WATCH_EVENT, 0, 0, len(watch)) + watch,
            b"\x01\x00\x00" + Packet._struct.pack(Op.ERROR, 1, 0, 7) + b"EAGAIN\x00",
        ],
        "blockscript": [
            auth + dbus(hello) + dbus(signal) + dbus(ok),
            auth + dbus(hello) + dbus(error),
            auth,
            # policyd's block socket (its replies: policyd.bus.blocksocket.encode_reply)
            b"BB1 ok /org/qubes/BlockBroker1/export/7",
            b"BB1 error org.qubes.BlockBroker1.Error.NotFound no export for backend/vbd/1/51712",
            b"BB1 busy org.qubes.BlockBroker1.Error.Busy this request was not read (use D-Bus)",
        ],
        "block_socket": [
            b"BB1 attach /local/domain/0/backend/vbd/1/51712",
            b"BB1 detach backend/vbd/3/768",
            b"BB1 attach backend/vbd/1/51712 extra",
        ],
    }


def main() -> None:
    for target, inputs in seeds().items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (directory / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


if __name__ == "__main__":
    main()
