"""blockbroker-qrexec-bridge: the dom0 qrexec service blockbroker.RequestExport.

Runs in dom0 once per call, as the user qrexec runs services as, with group blockbroker-qrexec
(the bus policy lets only that group and root call RequestExport). Everything on stdin comes
from a VM and is untrusted: at most MAX_LINE bytes are read, and the line is validated here, in
`parse_request`, before anything else sees it (names are `untrusted_*` until then). The source
domain is QREXEC_REMOTE_DOMAIN (set by qrexec, not by the VM); the target is the service
argument (`blockbroker.RequestExport+TARGET`, QREXEC_SERVICE_ARGUMENT). Neither can come from
the payload.

Request (one line, printable ASCII, at most 512 bytes with its newline; fields in any order,
separated by one space, each at most once):

    name=loop0 major=7 minor=0 diskseq=42 size=1048576 ro=1 [mode=ro|rw] [desc=backing.img]

Answer (one line on stdout; the exit status is 0 only for ok):

    ok devid=51728 backend=/local/domain/5/backend/vbd/1/51728
    denied <why>
    error <ErrorName> <message>

See docs/requests.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from client.model import (
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    REQUEST_IFACE,
    REQUEST_PATH_PREFIX,
)

MAX_LINE = 512
READ_TIMEOUT_S = 30.0  # for the VM to send its one line
MAX_ANSWER = 400
DEFAULT_TIMEOUT_S = 330.0  # policyd's default expiry (300 s) plus a margin
FINAL_STATES = ("approved", "denied", "expired", "withdrawn", "failed")

DOMAIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
NUMBER_RE = re.compile(r"0|[1-9][0-9]{0,19}")
DESC_RE = re.compile(r"[A-Za-z0-9._,:+@/-]{0,64}")
KEY_RE = re.compile(r"[a-z]{1,16}")
REQUIRED = ("name", "major", "minor", "diskseq", "size", "ro")
OPTIONAL = ("mode", "desc")
DOMAIN_KEYS = ("source", "src", "from", "domain", "target", "to", "dest")
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class BridgeError(Exception):
    """A refusal before policyd is asked: the name is the answer's error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class ExportRequest:
    source: str
    target: str
    name: str
    major: int
    minor: int
    diskseq: int
    size: int
    device_read_only: bool
    read_only: bool
    description: str

    def device(self) -> dict[str, Variant]:
        return {
            "name": Variant("s", self.name),
            "major": Variant("u", self.major),
            "minor": Variant("u", self.minor),
            "diskseq": Variant("t", self.diskseq),
            "size": Variant("t", self.size),
            "read-only": Variant("b", self.device_read_only),
            "description": Variant("s", self.description),
        }


def read_request(stream: BinaryIO, timeout_s: float = READ_TIMEOUT_S) -> bytes:
    """At most one line of at most MAX_LINE bytes (newline included); never more is read.

    A VM that sends nothing and keeps the connection open gets an answer after timeout_s
    instead of holding a dom0 process forever."""
    deadline = time.monotonic() + timeout_s
    fd = stream.fileno() if _has_fileno(stream) else None
    data = b""
    while b"\n" not in data:
        if fd is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BridgeError("InvalidArgument", f"no complete request within {timeout_s:g} s")
            chunk = os.read(fd, MAX_LINE + 1 - len(data))
        else:
            chunk = stream.read(MAX_LINE + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise BridgeError("InvalidArgument", f"request longer than {MAX_LINE} bytes")
    return data


def _has_fileno(stream: BinaryIO) -> bool:
    try:
        stream.fileno()
    except (OSError, AttributeError, ValueError):  # io.BytesIO: UnsupportedOperation
        return False
    return True


def _number(key: str, untrusted: str, maximum: int) -> int:
    if not NUMBER_RE.fullmatch(untrusted) or int(untrusted) > maximum:
        raise BridgeError("InvalidArgument", f"{key} must be a decimal number 0-{maximum}")
    return int(untrusted)


def parse_request(untrusted_line: bytes, environ: dict[str, str]) -> ExportRequest:
    """The one validation of a VM's request (and of qrexec's environment)."""
    untrusted_source = environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not DOMAIN_RE.fullmatch(untrusted_source):
        raise BridgeError("InvalidArgument", "QREXEC_REMOTE_DOMAIN is missing or not a VM name")
    source = untrusted_source
    untrusted_target = environ.get("QREXEC_SERVICE_ARGUMENT", "")
    if not DOMAIN_RE.fullmatch(untrusted_target):
        raise BridgeError(
            "InvalidArgument",
            "the target VM is the service argument: call blockbroker.RequestExport+TARGET",
        )
    target = untrusted_target
    if b"\n" in untrusted_line[:-1]:
        raise BridgeError("InvalidArgument", "request must be exactly one line")
    if untrusted_line.endswith(b"\n"):
        untrusted_line = untrusted_line[:-1]
    elif not untrusted_line:
        raise BridgeError("InvalidArgument", "empty request")
    if any(not 0x20 <= b <= 0x7E for b in untrusted_line):
        raise BridgeError(
            "InvalidArgument", "request must be one line of printable ASCII (no controls, no NUL)"
        )
    untrusted_text = untrusted_line.decode("ascii")
    fields: dict[str, str] = {}
    for untrusted_field in untrusted_text.split(" "):
        untrusted_key, sep, untrusted_value = untrusted_field.partition("=")
        if not sep or not KEY_RE.fullmatch(untrusted_key):
            raise BridgeError("InvalidArgument", "request fields are key=value, one space apart")
        if untrusted_key in DOMAIN_KEYS:
            raise BridgeError(
                "InvalidArgument",
                f"field {untrusted_key}= is not accepted: the source VM comes from qrexec and "
                "the target from the service argument",
            )
        if untrusted_key not in REQUIRED + OPTIONAL:
            raise BridgeError("InvalidArgument", f"unknown field {untrusted_key}")
        if untrusted_key in fields:
            raise BridgeError("InvalidArgument", f"field {untrusted_key} given twice")
        fields[untrusted_key] = untrusted_value
    missing = [key for key in REQUIRED if key not in fields]
    if missing:
        raise BridgeError("InvalidArgument", f"missing fields: {' '.join(missing)}")
    if not NAME_RE.fullmatch(fields["name"]):
        raise BridgeError("InvalidArgument", "name must be a-z then up to 15 of a-z 0-9")
    if fields["ro"] not in ("0", "1"):
        raise BridgeError("InvalidArgument", "ro must be 0 or 1")
    mode = fields.get("mode", "ro")
    if mode not in ("ro", "rw"):
        raise BridgeError("InvalidArgument", "mode must be ro or rw")
    description = fields.get("desc", "")
    if not DESC_RE.fullmatch(description):
        raise BridgeError(
            "InvalidArgument", "desc must be at most 64 of A-Z a-z 0-9 . _ , : + @ / -"
        )
    return ExportRequest(
        source=source,
        target=target,
        name=fields["name"],
        major=_number("major", fields["major"], U32_MAX),
        minor=_number("minor", fields["minor"], U32_MAX),
        diskseq=_number("diskseq", fields["diskseq"], U64_MAX),
        size=_number("size", fields["size"], U64_MAX),
        device_read_only=fields["ro"] == "1",
        read_only=mode == "ro",
        description=description,
    )


def one_line(text: str) -> str:
    """Printable ASCII, one line, bounded: safe to hand back to the VM."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:MAX_ANSWER]


class Watcher:
    """Collects request signals from before the call on, per sender and object path.

    Only signals from policyd's own unique name (the one that answered RequestExport) count:
    anyone on the bus may send a unicast signal to the bridge, and a fake "approved" must not
    reach the VM. policyd is lost when that unique name loses org.qubes.BlockBroker1; a
    NameOwnerChanged for policyd *taking* the name (activation, restart) is not a loss.
    """

    def __init__(self) -> None:
        self.owner: str | None = None  # policyd's unique name, once RequestExport answered
        self.props: dict[tuple[str, str], dict[str, Any]] = {}
        self.removed: set[tuple[str, str]] = set()
        self.lost_owners: set[str] = set()
        self.changed = asyncio.Event()

    def on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL or not msg.sender:
            return False
        if (
            msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and msg.signature == "sss"
            and msg.body[0] == BUS_NAME
            and msg.body[1]
        ):
            self.lost_owners.add(msg.body[1])  # that owner's pending requests are gone
        if msg.member == "InterfacesAdded" and msg.signature == "oa{sa{sv}}":
            path, ifaces = msg.body
            if REQUEST_IFACE in ifaces:
                values = {k: v.value for k, v in ifaces[REQUEST_IFACE].items()}
                self.props.setdefault((msg.sender, path), {}).update(values)
        elif msg.member == "PropertiesChanged" and msg.signature == "sa{sv}as":
            if msg.body[0] == REQUEST_IFACE and msg.path:
                values = {k: v.value for k, v in msg.body[1].items()}
                self.props.setdefault((msg.sender, msg.path), {}).update(values)
        elif (
            msg.member == "InterfacesRemoved"
            and msg.signature == "oas"
            and REQUEST_IFACE in msg.body[1]
        ):
            self.removed.add((msg.sender, msg.body[0]))
        self.changed.set()
        return False

    def final(self, path: str) -> dict[str, Any] | None:
        if self.owner is None:
            return None
        props = self.props.get((self.owner, path), {})
        if props.get("State") in FINAL_STATES:
            return props
        if (self.owner, path) in self.removed:
            return {"State": "failed"}
        if self.owner in self.lost_owners:
            return {"State": "lost"}
        return None


async def call(
    bus: MessageBus, path: str, iface: str, member: str, sig: str, body: list[Any]
) -> Message:
    reply = await bus.call(
        Message(
            destination=BUS_NAME if iface != "org.freedesktop.DBus" else "org.freedesktop.DBus",
            path=path,
            interface=iface,
            member=member,
            signature=sig,
            body=body,
        )
    )
    assert reply is not None
    return reply


def error_answer(reply: Message) -> str:
    name = reply.error_name or "Internal"
    text = str(reply.body[0]) if reply.body else ""
    if name.startswith(ERROR_PREFIX):
        name = name[len(ERROR_PREFIX) :]
        if name == "PolicyDenied":
            return one_line(f"denied {text}")
    else:
        name = "Unavailable" if "ServiceUnknown" in name or "NoReply" in name else "Bus"
    return one_line(f"error {name} {text}")


async def ask(request: ExportRequest, timeout_s: float) -> str:
    """Call RequestExport and wait for the decision; returns the answer line."""
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as e:
        return one_line(f"error Unavailable cannot reach the system bus: {type(e).__name__}")
    watcher = Watcher()
    bus.add_message_handler(watcher.on_message)
    try:
        for match in (
            f"type='signal',sender='{BUS_NAME}',path_namespace='{MANAGER_PATH}'",
            f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
            f"arg0='{BUS_NAME}'",
        ):
            await call(
                bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [match]
            )
        reply = await call(
            bus,
            MANAGER_PATH,
            MANAGER_IFACE,
            "RequestExport",
            "sa{sv}sa{sv}",
            [
                request.source,
                request.device(),
                request.target,
                {"read-only": Variant("b", request.read_only)},
            ],
        )
        if reply.message_type is MessageType.ERROR:
            return error_answer(reply)
        path = str(reply.body[0])
        if not path.startswith(REQUEST_PATH_PREFIX) or not reply.sender:
            return "error Internal unexpected reply from policyd"
        watcher.owner = reply.sender
        try:
            props = await asyncio.wait_for(_decision(watcher, path), timeout_s)
        except TimeoutError:
            await call(bus, path, REQUEST_IFACE, "Withdraw", "", [])
            return f"error Timeout no decision within {timeout_s:g} s; the request was withdrawn"
        return answer_for(props)
    finally:
        bus.disconnect()


async def _decision(watcher: Watcher, path: str) -> dict[str, Any]:
    while (props := watcher.final(path)) is None:
        watcher.changed.clear()
        await watcher.changed.wait()
    return props


def answer_for(props: dict[str, Any]) -> str:
    state = props.get("State")
    if state == "approved":
        return one_line(f"ok devid={props.get('Devid', 0)} backend={props.get('BackendPath', '')}")
    if state == "denied":
        return "denied by a person"
    if state == "expired":
        return "error Expired nobody decided in time"
    if state == "withdrawn":
        return "error Withdrawn the request was withdrawn"
    if state == "lost":
        return "error Unavailable policyd stopped while the request was pending; ask again"
    error = props.get("Error") or "Failed"
    if error == "DeviceChanged":
        return "error DeviceChanged the device changed after the request: nothing was exported"
    return one_line(f"error {error} the approval failed; see dom0's log")


def main(
    argv: list[str] | None = None,
    stdin: BinaryIO | None = None,
    environ: dict[str, str] | None = None,
    out: Callable[[str], None] | None = None,
) -> int:
    env = dict(os.environ if environ is None else environ)
    write = out or (lambda line: print(line, flush=True))
    try:
        untrusted_line = read_request(stdin or sys.stdin.buffer)
        request = parse_request(untrusted_line, env)
    except BridgeError as e:
        write(one_line(f"error {e.name} {e}"))
        return 1
    try:
        timeout_s = float(env.get("BLOCKBROKER_BRIDGE_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout_s = DEFAULT_TIMEOUT_S
    answer = asyncio.run(ask(request, timeout_s))
    write(answer)
    return 0 if answer.startswith("ok ") else 1


if __name__ == "__main__":
    sys.exit(main())
