"""The Python fuzz targets: one function per parser of untrusted input, checking properties.

Test code, no privileges, no I/O. Each target takes the fuzzer's bytes and raises
`PropertyViolation` (or lets an unexpected exception escape) when the code under test breaks a
property; a clean return means the input was handled as documented. The same functions run
under atheris (tests/fuzz/fuzzrun.py, `make fuzz`) and over the kept inputs as plain pytest cases
(tests/fuzz/test_fuzz_regressions.py). Structured targets read their input through atheris's
FuzzedDataProvider, which is deterministic, so a kept input replays exactly.

Properties checked, beyond "no crash":
- frame: parse_request accepts exactly what encode_request produces and re-encodes it
  byte for byte; likewise parse_reply and encode_reply; the only error is FrameError.
- policy: every line is a rule or a PolicySyntaxError naming the file and a real line; a rule's
  canonical text parses back to the same rule; the tags parser and the token validators raise
  only their named errors; evaluating a request against the parsed rules never fails internally.
- bridge: parse_request raises only BridgeError(InvalidArgument); an accepted request's canonical
  line parses back to it; its device descriptor passes policyd's validation or gets
  InvalidArgument; read_request never returns more than one bounded line.
- dbus_args: export_options, device_descriptor, request_options, domain_name, backend_path and
  source_path raise only InvalidArgument on any a{sv}/string a D-Bus peer can send, and what
  they accept satisfies their grammar.
- xs_values: XenStore values (_text), domid, mode, backend_type, backend_path and the start-up
  tag parser parse_managed raise only XenStoreError/InvalidArgument (parse_managed: never; a
  malformed backend becomes `problem`); what they accept satisfies their grammar.
- block_socket: policyd's block-socket request parser (parse_request) raises only
  InvalidArgument; an accepted request re-encodes to the same bytes; encode_reply of any error
  message is one printable-ASCII packet within MAX_REPLY.
- xs_wire: XsConnection's reply parser never raises, files replies only with a waiting request
  of the same op (or ERROR) and transaction, and gives the same outcome however the byte stream
  is split into reads.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable
from typing import Any

from atheris import FuzzedDataProvider
from dbus_fast import Variant
from pyxs._internal import Op
from pyxs.exceptions import PyXSError

from broker import protocol
from client import bridge
from policyd import brokerclient, errors, modes, validate
from policyd.bus import blocksocket
from policyd.policy import engine, parser, tags, tokens
from policyd.policy.errors import PolicySyntaxError, TagsSyntaxError
from policyd.requests import vmdevice
from policyd.xenstore import client as xsclient
from policyd.xenstore import connection, store


class PropertyViolation(AssertionError):
    """The code under test broke a property (not merely crashed)."""


def check(condition: object, what: str) -> None:
    if not condition:
        raise PropertyViolation(what)


def only(exc: BaseException, *allowed: type[BaseException]) -> None:
    """Re-raise `exc` unless its type is exactly one of `allowed` (subclasses are not enough
    where the named class is final, so callers list every class they document)."""
    if type(exc) not in allowed:
        raise exc


# --- frame: the broker's wire format ----------------------------------------------------------


def maybe(fdp: FuzzedDataProvider, maximum: int) -> int:
    return fdp.ConsumeIntInRange(0, maximum) if fdp.ConsumeBool() else 0


def frame(data: bytes) -> None:
    try:
        request = protocol.parse_request(data)
    except protocol.FrameError as e:
        only(e, protocol.FrameError)
    else:
        check(isinstance(request.kind, protocol.RequestKind), "kind is a RequestKind")
        check(len(request.path) <= protocol.MAX_PATH, "path bounded")
        check(brokerclient.encode_request(request) == data, "request re-encodes identically")
    try:
        reply = brokerclient.parse_reply(data)
    except protocol.FrameError as e:
        only(e, protocol.FrameError)
    else:
        check(protocol.encode_reply(reply) == data, "reply re-encodes identically")
    # The other direction: whatever fields a sender picks, encode_request sends only what
    # parse_request accepts, and that parses back to the same request.
    fdp = FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind not in protocol.RequestKind.__members__.values():
        return
    fields = protocol.Request(
        protocol.RequestKind(kind),
        protocol.RequestFlag(fdp.ConsumeIntInRange(0, 0xF)),
        maybe(fdp, 0xFFFFFFFF),  # each field in its wire range, often zero
        maybe(fdp, 0xFFFFFFFF),
        maybe(fdp, 0xFFFFFFFF),
        maybe(fdp, (1 << 64) - 1),
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, protocol.MAX_PATH + 2)),
    )
    try:
        encoded = brokerclient.encode_request(fields)
    except protocol.FrameError as e:
        only(e, protocol.FrameError)
        return
    check(protocol.parse_request(encoded) == fields, "encoded request parses back")


# --- policy: policy files, tags files, rule tokens ----------------------------------------------

FILE = "fuzz.policy"


def policy(data: bytes) -> None:
    lines = data[: parser.MAX_FILE_SIZE + 1].count(b"\n") + 1
    validating = parser.ValidatingParser()
    check(validating.parse_bytes(data, FILE) is True, "the linter reads every line")
    for err in validating.errors:
        only(err, PolicySyntaxError)
        check(err.filepath == FILE and err.lineno is not None, "an error names file:line")
        check(1 <= err.lineno <= lines, "an error names a real line")  # type: ignore[operator]
    for rule in validating.rules:
        check(rule.text.isascii() and rule.text.isprintable(), "a rule is printable ASCII")
        again = parser.parse_rule(rule.text, FILE, rule.lineno)
        check(again == rule, f"rule {rule.text!r} parses back to itself")
    found, tag_errors = tags.parse_tags(data, FILE)
    for terr in tag_errors:
        only(terr, TagsSyntaxError)
    for domain, domain_tags in found.items():
        check(tokens.DOMAIN_NAME_RE.fullmatch(domain), "a tagged domain is a domain name")
        check(all(tokens.validate_tag(t) == t for t in domain_tags), "tags are tags")
    text = data.decode("utf-8", "replace")
    for validator in (tokens.validate_device, tokens.device_for_path, tokens.validate_tag):
        try:
            accepted = validator(text)
        except ValueError as e:
            only(e, ValueError)
        else:
            check(accepted.isascii() and accepted.isprintable(), "accepted tokens are ASCII")
    policy_ = engine.Policy(validating.rules, None, (FILE,), tags.no_tags)
    fields = [*text.split(" "), "", "", "", "", ""][:5]
    decision = policy_.evaluate(engine.Request(*fields))
    check(not decision.reason.startswith("internal error"), f"evaluate: {decision.reason}")


# --- bridge: the qrexec service's request line ---------------------------------------------------

ENV = {"QREXEC_REMOTE_DOMAIN": "sys-usb", "QREXEC_SERVICE_ARGUMENT": "work"}


def canonical_line(r: bridge.ExportRequest) -> bytes:
    return (
        f"name={r.name} major={r.major} minor={r.minor} diskseq={r.diskseq} size={r.size} "
        f"ro={int(r.device_read_only)} mode={'ro' if r.read_only else 'rw'} desc={r.description}\n"
    ).encode()


def bridge_request(data: bytes) -> None:
    try:
        line = bridge.read_request(io.BytesIO(data), timeout_s=1.0)
    except bridge.BridgeError as e:
        check(e.name == "InvalidArgument", "read_request refuses with InvalidArgument")
    else:
        # it stops reading at the read that brought a newline (what follows in that read is
        # kept, and parse_request refuses it), or at EOF
        check(len(line) <= bridge.MAX_LINE, "read_request returns at most MAX_LINE bytes")
        check(data.startswith(line), "read_request returns a prefix of the stream")
        check(b"\n" in line or line == data, "a line, or the whole stream")
        try:
            bridge.parse_request(line, ENV)
        except bridge.BridgeError:
            pass
        else:
            check(line.count(b"\n") <= 1, "one line only is accepted")
    try:
        request = bridge.parse_request(data, ENV)
    except bridge.BridgeError as e:
        only(e, bridge.BridgeError)
        check(e.name == "InvalidArgument", "the bridge refuses with InvalidArgument")
        check(bridge.one_line(f"error {e.name} {e}").isprintable(), "answer is printable")
    else:
        check((request.source, request.target) == ("sys-usb", "work"), "domains from qrexec")
        check(bridge.parse_request(canonical_line(request), ENV) == request, "line round-trips")
        try:
            device = vmdevice.device_descriptor(request.device())
        except errors.InvalidArgument as e:
            only(e, errors.InvalidArgument)
        else:
            check(
                (device.name, device.major, device.minor, device.diskseq, device.size)
                == (request.name, request.major, request.minor, request.diskseq, request.size),
                "policyd sees the device the VM named",
            )
    # qrexec's environment is set by qrexec, but checked all the same: a fuzzed source name
    text = data[:64].decode("latin-1")
    env = {"QREXEC_REMOTE_DOMAIN": text, "QREXEC_SERVICE_ARGUMENT": "work"}
    good = b"name=loop0 major=7 minor=0 diskseq=1 size=512 ro=1\n"
    try:
        check(bridge.parse_request(good, env).source == text, "source is qrexec's")
    except bridge.BridgeError as e:
        only(e, bridge.BridgeError)


# --- dbus_args: what policyd validates of D-Bus arguments ----------------------------------------

# Values as dbus_fast unmarshals them: a peer chooses signature and value, within D-Bus's types.
_BASIC: dict[str, Callable[[FuzzedDataProvider], Any]] = {
    "b": lambda f: f.ConsumeBool(),
    "y": lambda f: f.ConsumeIntInRange(0, 0xFF),
    "n": lambda f: f.ConsumeIntInRange(-(1 << 15), (1 << 15) - 1),
    "q": lambda f: f.ConsumeIntInRange(0, 0xFFFF),
    "i": lambda f: f.ConsumeIntInRange(-(1 << 31), (1 << 31) - 1),
    "u": lambda f: (
        f.PickValueInList([0, 1, 0xFFFFFFFF, 51728, 202 << 8, 1 << 28])
        if f.ConsumeBool()
        else f.ConsumeIntInRange(0, 0xFFFFFFFF)
    ),
    "x": lambda f: f.ConsumeIntInRange(-(1 << 63), (1 << 63) - 1),
    "t": lambda f: f.ConsumeIntInRange(0, (1 << 64) - 1),
    "d": lambda f: f.ConsumeRegularFloat(),
    "s": lambda f: dbus_string(f),
    "o": lambda f: "/" + "/".join(f.PickValueInList(["a", "b_1", "Z9"]) for _ in range(3)),
    "g": lambda f: "s",
    "ay": lambda f: f.ConsumeBytes(f.ConsumeIntInRange(0, 16)),
    "as": lambda f: [dbus_string(f) for _ in range(f.ConsumeIntInRange(0, 3))],
}
_KEYS = sorted(
    set(validate.OPTION_TYPES) | set(vmdevice.DESCRIPTOR_TYPES) | set(vmdevice.OPTION_TYPES)
)


def dbus_string(f: FuzzedDataProvider) -> str:
    """A D-Bus string: valid UTF-8 without NUL (dbus_fast decodes strictly)."""
    raw = f.ConsumeBytes(f.ConsumeIntInRange(0, 80))
    return raw.decode("utf-8", "replace").replace("\0", "")


def a_sv(f: FuzzedDataProvider) -> dict[str, Variant]:
    result: dict[str, Variant] = {}
    for _ in range(f.ConsumeIntInRange(0, 9)):
        key = f.PickValueInList(_KEYS) if f.ConsumeProbability() < 0.9 else dbus_string(f)
        sig = f.PickValueInList(sorted(_BASIC))
        if f.ConsumeProbability() < 0.6 and key in vmdevice.DESCRIPTOR_TYPES:
            sig = vmdevice.DESCRIPTOR_TYPES[key]  # mostly the right type: reach the checks
        result[key] = Variant(sig, _BASIC[sig](f))
    return result


def invalid_argument(call: Callable[[], Any]) -> Any:
    """call's result, or None if it raised InvalidArgument (anything else escapes)."""
    try:
        return call()
    except errors.InvalidArgument as e:
        only(e, errors.InvalidArgument)
        return None


def dbus_args(data: bytes) -> None:
    f = FuzzedDataProvider(data)
    options = invalid_argument(lambda: validate.export_options(a_sv(f)))
    if options is not None:
        check(options.devid is None or validate.is_disk_devid(options.devid), "devid is a disk")
        if options.devid is not None:
            check(validate.vdev_name(options.devid).startswith("xvd"), "devid names an xvd")
    device = invalid_argument(lambda: vmdevice.device_descriptor(a_sv(f)))
    if device is not None:
        check(vmdevice.DEVICE_NAME_RE.fullmatch(device.name), "device name grammar")
        check(1 <= device.major <= vmdevice.MAX_MAJOR, "major range")
        check(0 <= device.minor <= vmdevice.MAX_MINOR, "minor range")
        check(device.diskseq > 0 and device.size > 0, "diskseq and size nonzero")
        check(device.description.isascii() and len(device.description) <= 64, "description")
        max_expiry = f.ConsumeIntInRange(1, 3600)
        got = invalid_argument(lambda: vmdevice.request_options(a_sv(f), device, max_expiry))
        if got is not None:
            check(1 <= got.expiry_s <= max_expiry, "expiry range")
            check(got.read_only or not device.read_only, "rw only of a rw device")
    text = dbus_string(f)
    name = invalid_argument(lambda: validate.domain_name(text))
    check(name is None or tokens.DOMAIN_NAME_RE.fullmatch(name), "domain name grammar")
    home = f.ConsumeIntInRange(0, validate.MAX_DOMID)
    be = invalid_argument(lambda: validate.backend_path(text, home))
    if be is not None:
        check(validate.is_disk_devid(be.devid), "backend devid is a disk")
        check(max(be.backend_domid, be.frontend_domid) <= validate.MAX_DOMID, "domid range")
        check(be.path.endswith(f"/backend/vbd/{be.frontend_domid}/{be.devid}"), "path")
    path = invalid_argument(lambda: validate.source_path(text))
    if path is not None:
        check(path.isascii() and path.isprintable() and path.startswith("/"), "path chars")
        check(os.path.normpath(path) == path and not path.startswith("//"), "normalized")
    # typed_dict takes any object a handler might pass on
    other = f.PickValueInList([None, 1, "x", [], {1: Variant("b", True)}, {"devid": 3}])
    invalid_argument(lambda: validate.export_options(other))


# --- xs_values: what policyd reads from XenStore ------------------------------------------------

NODE_NAMES = (store.SOURCE_NODE, "params", "mode", "physical-device", "physical-device-path")


def xs_value(f: FuzzedDataProvider) -> str | None:
    """A node's value as policyd's client returns it (None: absent), or None if refused."""
    choice = f.ConsumeIntInRange(0, 7)
    if choice == 0:
        return None
    if choice == 1:  # a likely well-formed value, so the checks behind the grammars run
        return f.PickValueInList(["7:0", "0 export 1", "1 vm 0", "w", "r", "2a", "/srv/a.img"])
    raw = f.ConsumeBytes(f.ConsumeIntInRange(0, 64))
    try:
        return xsclient._text("/fuzz", raw)
    except xsclient.XenStoreValueError as e:
        only(e, xsclient.XenStoreValueError)
        return None


def xenstore_error(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except errors.XenStoreError as e:
        only(e, errors.XenStoreError)
        return None


def xs_values(data: bytes) -> None:
    f = FuzzedDataProvider(data)
    text = xs_value(f) or ""
    check(text.isascii() and text.isprintable(), "XenStore text is printable ASCII")
    domid = xenstore_error(lambda: validate.domid(text))
    check(domid is None or (0 <= domid <= validate.MAX_DOMID and str(domid) == text), "domid")
    check(xenstore_error(lambda: validate.mode(text)) in (None, *modes.MODES), "mode")
    kind = xenstore_error(lambda: validate.backend_type(text))
    check(kind is None or validate.BACKEND_TYPE_RE.fullmatch(kind), "backend type")
    name = store.valid_name(text)
    check(name == "" or tokens.DOMAIN_NAME_RE.fullmatch(name), "domain name")
    source = xenstore_error(lambda: validate.source_path(text, errors.XenStoreError))
    check(source is None or source.startswith("/"), "source path")
    # parse_managed: a backend path validated as store.managed does, then its nodes
    home = f.ConsumeIntInRange(0, 3)
    relative = f"/local/domain/{f.ConsumeIntInRange(0, 3)}/backend/vbd/{text}"
    be = invalid_argument(lambda: validate.backend_path(relative, home))
    if be is None:
        be = validate.backend_path(f"/local/domain/{home}/backend/vbd/1/51728", home)
    tag = xs_value(f) or store.UNTAGGED_ATTACH
    nodes = {n: xs_value(f) for n in NODE_NAMES}
    nodes["diskseq"] = xs_value(f)
    found = store.parse_managed(be, tag, home, nodes, f.ConsumeBool())
    if not found.problem:
        check(found.kind in store.TAG_KINDS, "kind")
        check(found.mode in modes.MODES, "mode of a good backend")
        check((found.kind == "vm") == (found.backend_domid != home), "vm exports live in VMs")
        check(found.diskseq >= 0 and found.major >= 0 and found.minor >= 0, "numbers")
    else:
        check(found.problem.isprintable(), "problem is printable")


# --- xs_wire: xenstored's replies on policyd's connection ----------------------------------------

_LOOP = asyncio.new_event_loop()
_OPS = [Op.READ, Op.WRITE, Op.DIRECTORY, Op.TRANSACTION_START, Op.TRANSACTION_END, Op.WATCH]


class _Transport:
    def abort(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


def _feed(requests: list[tuple[int, int]], stream: bytes, cuts: list[int]) -> tuple[Any, ...]:
    """Replies to `requests` (op, tx_id) read as `stream` split at `cuts`: the outcome."""
    lost: list[str] = []
    events: list[tuple[str, str]] = []

    def on_watch(path: str, token: str) -> bool:
        events.append((path, token))
        return token == "policyd"

    conn = connection.XsConnection(lambda _c, e: lost.append(f"{type(e).__name__}: {e}"), on_watch)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    batch = connection._Batch(len(requests), _LOOP.create_future())
    for index, (op, tx_id) in enumerate(requests):
        req_id = conn._new_id()
        conn._waiting[req_id] = (batch, index, op, tx_id)
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        conn.data_received(stream[start:cut])  # raises nothing: its own except catches all
        start = max(start, cut)
    check(len(lost) <= 1, "the owner learns of a loss once")
    check(conn.closed == bool(lost), "closed exactly when lost")
    if batch.done.done():
        exc = batch.done.exception()
        if exc is None:
            check(not conn.closed or batch.left == 0, "a finished batch has every reply")
        else:
            check(isinstance(exc, errors.XenStoreError), "a batch fails with XenStoreError")
    replies = []
    for reply in batch.replies:
        check(isinstance(reply, bytes | PyXSError), "a reply is a payload or an error")
        check(not isinstance(reply, bytes) or len(reply) <= 4096, "payload bounded")
        replies.append(reply if isinstance(reply, bytes) else ("error", reply.args))
    for path, token in events:
        check(path.isascii() and token.isascii(), "watch event is ASCII")
    return (lost, events, batch.left, replies, conn.closed)


def xs_wire(data: bytes) -> None:
    f = FuzzedDataProvider(data)
    requests = [
        (f.PickValueInList(_OPS), f.PickValueInList([0, 0, 7]))
        for _ in range(f.ConsumeIntInRange(0, 3))
    ]
    cuts = [f.ConsumeIntInRange(0, 256) for _ in range(f.ConsumeIntInRange(0, 4))]
    stream = f.ConsumeBytes(f.remaining_bytes())
    whole = _feed(requests, stream, [])
    split = _feed(requests, stream, cuts)
    check(whole == split, f"the outcome does not depend on how reads split the stream: {cuts}")


# --- block_socket: the block script's direct path to policyd ---------------------------------


def block_socket(data: bytes) -> None:
    request = invalid_argument(lambda: blocksocket.parse_request(data))
    if request is not None:
        check(request.member in ("Attach", "Detach"), "a Manager method")
        check(request.encode() == data, "re-encodes to the same bytes")
        # the exporter's validation of the path raises only InvalidArgument, as on D-Bus
        invalid_argument(lambda: validate.backend_path(request.untrusted_path))
    # a reply carries any error text as one bounded, printable packet
    text = data.decode("utf-8", "surrogateescape")
    for busy in (False, True):
        reply = blocksocket.encode_reply(errors.NotFound(text), busy=busy)
        check(len(reply) <= blocksocket.MAX_REPLY, "reply within MAX_REPLY")
        check(all(0x20 <= b < 0x7F for b in reply), "reply is printable ASCII")
        head = b"BB1 busy " if busy else b"BB1 error "
        check(reply.startswith(head + b"org.qubes.BlockBroker1.Error.NotFound "), "reply head")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "block_socket": block_socket,
    "frame": frame,
    "policy": policy,
    "bridge": bridge_request,
    "dbus_args": dbus_args,
    "xs_values": xs_values,
    "xs_wire": xs_wire,
}
