"""VM export requests: validation, policy, pending Request objects, approval, expiry.

Unprivileged policyd code. The device descriptor comes from a VM (through the qrexec bridge)
and is untrusted: `device_descriptor()` is the one place that validates it (values are named
`untrusted_*` until then). The source domain comes from qrexec (QREXEC_REMOTE_DOMAIN, passed by
the bridge), never from the VM's payload; only root and the bridge's group reach RequestExport
(policyd.authz). Approve/Deny are polkit-gated (org.qubes.blockbroker.approve).

The device lives in the source VM, so policyd opens nothing: an approved export writes the vbd
nodes with backend = the source VM (its blkback opens /dev/NAME) and frontend = the target VM.
The VM publishes the device it means in its own XenStore dir,
/local/domain/<source-domid>/data/blockbroker/<name>/{dev,diskseq} ("MAJOR:MINOR" and the
decimal diskseq, as sysfs shows them); the approval re-reads that in the same transaction that
writes the nodes, and refuses with DeviceChanged (writing nothing) unless it still names the
approved major:minor and diskseq. See docs/requests.md.

No `from __future__ import annotations`: dbus-fast reads RequestInterface's annotations.
"""

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusBool, DBusStr, DBusUInt32, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from policyd import audit, errors, logfmt, validate
from policyd.audit import PolicyGate
from policyd.exporter import Exporter
from policyd.policy import Action
from policyd.xenstore import (
    MAX_DOMAINS,
    PhysicalDevice,
    Tx,
    VbdSpec,
    XenStore,
    physical_nodes,
    vbd_in_use,
    write_vbd,
)

REQUEST_IFACE = "org.qubes.BlockBroker1.Request"
REQUEST_PATH_PREFIX = "/org/qubes/BlockBroker1/request/"
REQUEST_PATH_RE = re.compile(re.escape(REQUEST_PATH_PREFIX) + r"([1-9][0-9]{0,9})")
DEFAULT_EXPIRY_S = 300
MAX_EXPIRY_S = 86400
PUBLISHED_DIR = "data/blockbroker"  # below /local/domain/<source-domid>/
MAX_TOMBSTONES = 1024
MAX_PENDING = 256  # all VMs together; a flood of requests cannot grow policyd without bound
MAX_PENDING_PER_SOURCE = 16  # one VM cannot crowd out the others' requests

DEVICE_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
DESCRIPTION_RE = re.compile(r"[ -~]{0,64}")  # printable ASCII, bounded
PUBLISHED_DEV_RE = re.compile(r"([1-9][0-9]{0,3}):(0|[1-9][0-9]{0,6})")
PUBLISHED_DISKSEQ_RE = re.compile(r"[1-9][0-9]{0,19}")
MAX_MAJOR = (1 << 12) - 1  # Linux MAJORBITS
MAX_MINOR = (1 << 20) - 1  # Linux MINORBITS
U64_MAX = (1 << 64) - 1
DESCRIPTOR_TYPES = {
    "name": "s",
    "major": "u",
    "minor": "u",
    "diskseq": "t",
    "size": "t",
    "read-only": "b",
    "description": "s",
}
REQUIRED_KEYS = frozenset(DESCRIPTOR_TYPES) - {"description"}
OPTION_TYPES = {"read-only": "b", "timeout": "u"}

STATE_PENDING = "pending"
STATE_APPROVING = "approving"
STATE_APPROVED = "approved"
STATE_DENIED = "denied"
STATE_EXPIRED = "expired"
STATE_WITHDRAWN = "withdrawn"
STATE_FAILED = "failed"


@dataclass(frozen=True)
class DeviceDescriptor:
    """A VM's block device, as the VM describes it (validated, still the VM's claim)."""

    name: str
    major: int
    minor: int
    diskseq: int
    size: int
    read_only: bool
    description: str


@dataclass(frozen=True)
class RequestOptions:
    read_only: bool
    expiry_s: int


def device_descriptor(untrusted_device: object) -> DeviceDescriptor:
    """The one validation of a VM's device descriptor (a{sv}); InvalidArgument names the field."""
    if not isinstance(untrusted_device, dict):
        raise errors.InvalidArgument("device must be a{sv}")
    values: dict[str, Any] = {}
    for untrusted_key, untrusted_variant in untrusted_device.items():
        expected = DESCRIPTOR_TYPES.get(untrusted_key) if isinstance(untrusted_key, str) else None
        if expected is None:
            raise errors.InvalidArgument(
                f"unknown device field {validate._show(untrusted_key)}; known fields: "
                f"{', '.join(sorted(DESCRIPTOR_TYPES))}"
            )
        if getattr(untrusted_variant, "signature", None) != expected:
            raise errors.InvalidArgument(f"device field {untrusted_key} must have type {expected}")
        values[untrusted_key] = untrusted_variant.value
    missing = REQUIRED_KEYS - set(values)
    if missing:
        raise errors.InvalidArgument(f"device fields missing: {', '.join(sorted(missing))}")
    untrusted_name = values["name"]
    if not DEVICE_NAME_RE.fullmatch(untrusted_name):
        raise errors.InvalidArgument(
            f"device name {validate._show(untrusted_name)} is invalid: expected a-z, then up "
            "to 15 of a-z 0-9 (loop0, sda1, xvdi)"
        )
    if not 1 <= values["major"] <= MAX_MAJOR:
        raise errors.InvalidArgument(f"device major {values['major']} is not in 1-{MAX_MAJOR}")
    if not 0 <= values["minor"] <= MAX_MINOR:
        raise errors.InvalidArgument(f"device minor {values['minor']} is not in 0-{MAX_MINOR}")
    if values["diskseq"] == 0:
        raise errors.InvalidArgument(
            "device diskseq is 0: the VM's kernel must report a diskseq (Linux 5.15+); "
            "an approval is pinned to it"
        )
    if values["size"] == 0:
        raise errors.InvalidArgument("device size is 0: nothing to export")
    untrusted_description = values.get("description", "")
    if not DESCRIPTION_RE.fullmatch(untrusted_description):
        raise errors.InvalidArgument(
            "device description must be at most 64 printable ASCII characters"
        )
    return DeviceDescriptor(
        name=untrusted_name,
        major=values["major"],
        minor=values["minor"],
        diskseq=values["diskseq"],
        size=values["size"],
        read_only=values["read-only"],
        description=untrusted_description,
    )


def request_options(
    untrusted_options: object, device: DeviceDescriptor, max_expiry_s: int
) -> RequestOptions:
    """read-only (b, default true), timeout (u seconds, 1 to policyd's --request-expiry)."""
    if not isinstance(untrusted_options, dict):
        raise errors.InvalidArgument("options must be a{sv}")
    values: dict[str, Any] = {}
    for key, variant in untrusted_options.items():
        expected = OPTION_TYPES.get(key) if isinstance(key, str) else None
        if expected is None:
            raise errors.InvalidArgument(
                f"unknown option {validate._show(key)}; known options: "
                f"{', '.join(sorted(OPTION_TYPES))}"
            )
        if getattr(variant, "signature", None) != expected:
            raise errors.InvalidArgument(f"option {key} must have type '{expected}'")
        values[key] = variant.value
    read_only = bool(values.get("read-only", True))
    if device.read_only and not read_only:
        raise errors.InvalidArgument(f"{device.name} is read-only in its VM; ask for read-only")
    expiry = values.get("timeout", max_expiry_s)
    if not 1 <= expiry <= max_expiry_s:
        raise errors.InvalidArgument(f"timeout must be 1-{max_expiry_s} seconds")
    return RequestOptions(read_only, expiry)


def published_dir(source_domid: int, name: str) -> str:
    return f"/local/domain/{source_domid}/{PUBLISHED_DIR}/{name}"


def check_published(tx: Tx, source_domid: int, device: DeviceDescriptor) -> None:
    """DeviceChanged unless the VM still publishes the same major:minor and diskseq."""
    base = published_dir(source_domid, device.name)
    try:
        untrusted_dev = tx.read(f"{base}/dev")
        untrusted_diskseq = tx.read(f"{base}/diskseq")
    except errors.XenStoreError as e:
        raise errors.DeviceChanged(f"{base} is unreadable ({e}); nothing was written") from None
    want = f"{device.major}:{device.minor} diskseq {device.diskseq}"
    if untrusted_dev is None or untrusted_diskseq is None:
        raise errors.DeviceChanged(
            f"the VM no longer publishes {device.name} ({base}/dev, diskseq); the approved "
            f"device ({want}) is gone: nothing was written"
        )
    m = PUBLISHED_DEV_RE.fullmatch(untrusted_dev)
    seq_ok = PUBLISHED_DISKSEQ_RE.fullmatch(untrusted_diskseq) is not None
    now = (int(m[1]), int(m[2])) if m else None
    seq = int(untrusted_diskseq) if seq_ok else None
    if now != (device.major, device.minor) or seq != device.diskseq:
        raise errors.DeviceChanged(
            f"{device.name} in the VM is now {validate._show(untrusted_dev, 16)} diskseq "
            f"{validate._show(untrusted_diskseq, 24)}, not {want} as requested: nothing was "
            "written; the VM must ask again"
        )


def check_not_shared(tx: Tx, spec: VbdSpec) -> None:
    """Busy if the VM's device is exported read-write, or rw is asked while it is exported at
    all (the same rule as for dom0's exports). Read from the VM's backend nodes, which policyd
    wrote (the VM can read them, but their owner is policyd's domain only until blkback runs)."""
    phys = spec.physical
    wanted = dict(physical_nodes(phys))["physical-device"]
    base = f"/local/domain/{spec.backend_domid}/backend/vbd"
    for frontend in tx.children(base)[:MAX_DOMAINS]:
        for devid in tx.children(f"{base}/{frontend}")[:MAX_DOMAINS]:
            be_dir = f"{base}/{frontend}/{devid}"
            if tx.read(f"{be_dir}/physical-device") != wanted:
                continue
            if spec.mode == "w" or tx.read(f"{be_dir}/mode") != "r":
                raise errors.Busy(
                    f"{phys.device_path} of the VM is already exported ({be_dir}); a read-write "
                    "export needs it exclusively, and a read-write one is never shared"
                )


def write_vm_vbd(xs: XenStore, spec: VbdSpec, source_domid: int, device: DeviceDescriptor) -> int:
    """In one transaction: re-check the published device, check sharing, pick a devid, write
    FE and BE nodes. Runs on the XenStore thread. Returns the devid."""

    def body(tx: Tx) -> int:
        check_published(tx, source_domid, device)
        check_not_shared(tx, spec)
        free = (d for d in validate.hotplug_devids() if not vbd_in_use(tx, spec, d))
        chosen = next(free, 0)
        if not chosen:
            raise errors.Busy(f"no free xvd device number in domain {spec.frontend_domid}")
        write_vbd(tx, spec, chosen)
        return chosen

    return xs.transact(body)


def check_published_now(xs: XenStore, source_domid: int, device: DeviceDescriptor) -> None:
    xs.transact(lambda tx: check_published(tx, source_domid, device))


@dataclass(eq=False)
class PendingRequest:
    number: int
    source: str
    source_domid: int
    target: str
    target_domid: int
    device: DeviceDescriptor
    mode: str  # "r" | "w"
    created_us: int
    expires_us: int
    requester: str  # the bridge connection's unique bus name
    location: str  # the policy rule that said "ask"
    state: str = STATE_PENDING
    backend_path: str = ""
    devid: int = 0
    error: str = ""  # the error name when State is failed (e.g. DeviceChanged)
    timer: asyncio.TimerHandle | None = None

    @property
    def object_path(self) -> str:
        return f"{REQUEST_PATH_PREFIX}{self.number}"

    @property
    def policy_mode(self) -> str:
        return "rw" if self.mode == "w" else "ro"


REQUEST_SIGNATURES = {
    "Id": "u",
    "Source": "s",
    "Target": "s",
    "DeviceName": "s",
    "Major": "u",
    "Minor": "u",
    "Diskseq": "t",
    "Size": "t",
    "Mode": "s",
    "DeviceReadOnly": "b",
    "Description": "s",
    "Created": "t",
    "Expires": "t",
    "State": "s",
    "Rule": "s",
    "BackendPath": "s",
    "Devid": "u",
    "Error": "s",
}


def request_values(req: PendingRequest) -> dict[str, Any]:
    dev = req.device
    return {
        "Id": req.number,
        "Source": req.source,
        "Target": req.target,
        "DeviceName": dev.name,
        "Major": dev.major,
        "Minor": dev.minor,
        "Diskseq": dev.diskseq,
        "Size": dev.size,
        "Mode": req.mode,
        "DeviceReadOnly": dev.read_only,
        "Description": dev.description,
        "Created": req.created_us,
        "Expires": req.expires_us,
        "State": req.state,
        "Rule": req.location,
        "BackendPath": req.backend_path,
        "Devid": req.devid,
        "Error": req.error,
    }


def request_variants(req: PendingRequest) -> dict[str, Variant]:
    return {k: Variant(REQUEST_SIGNATURES[k], v) for k, v in request_values(req).items()}


def not_dispatched() -> NoReturn:
    raise errors.Internal("method call was not dispatched")


class RequestInterface(ServiceInterface):
    """org.qubes.BlockBroker1.Request; methods are dispatched by policyd.service."""

    def __init__(self, req: PendingRequest) -> None:
        super().__init__(REQUEST_IFACE)
        self.req = req

    @dbus_method()
    def Approve(self) -> None:
        not_dispatched()

    @dbus_method()
    def Deny(self) -> None:
        not_dispatched()

    @dbus_method()
    def Withdraw(self) -> None:
        not_dispatched()

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusUInt32:
        return self.req.number

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> DBusStr:
        return self.req.source

    @dbus_property(access=PropertyAccess.READ)
    def Target(self) -> DBusStr:
        return self.req.target

    @dbus_property(access=PropertyAccess.READ)
    def DeviceName(self) -> DBusStr:
        return self.req.device.name

    @dbus_property(access=PropertyAccess.READ)
    def Major(self) -> DBusUInt32:
        return self.req.device.major

    @dbus_property(access=PropertyAccess.READ)
    def Minor(self) -> DBusUInt32:
        return self.req.device.minor

    @dbus_property(access=PropertyAccess.READ)
    def Diskseq(self) -> DBusUInt64:
        return self.req.device.diskseq

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> DBusUInt64:
        return self.req.device.size

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return self.req.mode

    @dbus_property(access=PropertyAccess.READ)
    def DeviceReadOnly(self) -> DBusBool:
        return self.req.device.read_only

    @dbus_property(access=PropertyAccess.READ)
    def Description(self) -> DBusStr:
        return self.req.device.description

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusUInt64:
        return self.req.created_us

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> DBusUInt64:
        return self.req.expires_us

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.req.state

    @dbus_property(access=PropertyAccess.READ)
    def Rule(self) -> DBusStr:
        return self.req.location

    @dbus_property(access=PropertyAccess.READ)
    def BackendPath(self) -> DBusStr:
        return self.req.backend_path

    @dbus_property(access=PropertyAccess.READ)
    def Devid(self) -> DBusUInt32:
        return self.req.devid

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> DBusStr:
        return self.req.error


class Listener(Protocol):
    """What the D-Bus layer does when a request appears, changes or goes away."""

    def request_added(self, req: PendingRequest) -> None: ...
    def request_changed(self, req: PendingRequest, names: list[str]) -> None: ...
    def request_removed(self, req: PendingRequest) -> None: ...


def _now_us() -> int:
    return time.time_ns() // 1000


class Requests:
    """Pending requests and their decisions. All methods run on the event loop."""

    def __init__(
        self,
        exporter: Exporter,
        gate: PolicyGate,
        listener: Listener,
        expiry_s: int = DEFAULT_EXPIRY_S,
    ) -> None:
        self.exporter = exporter
        self.gate = gate
        self.listener = listener
        self.expiry_s = expiry_s
        self.pending: dict[int, PendingRequest] = {}
        self._finished: OrderedDict[int, str] = OrderedDict()  # number -> final state
        self._next = 1

    async def _xs(self, fn: Callable[..., Any], *args: object) -> Any:
        return await self.exporter.xenstore_call(fn, *args)

    # -- RequestExport ----------------------------------------------------------------------

    async def request_export(
        self,
        untrusted_source: object,
        untrusted_device: object,
        untrusted_target: object,
        untrusted_options: object,
    ) -> str:
        """The Request's path. ask: it is pending; allow: the nodes are written already and
        the object has come and gone (State approved); deny: PolicyDenied, no object."""
        source = validate.domain_name(untrusted_source)
        target = validate.domain_name(untrusted_target)
        device = device_descriptor(untrusted_device)
        opts = request_options(untrusted_options, device, self.expiry_s)
        source_domid = await self._xs(self.exporter.xenstore.find_domain, source)
        target_domid = await self._xs(self.exporter.xenstore.find_domain, target)
        if source_domid == 0:
            raise errors.InvalidArgument("the source of a request is a VM, never dom0")
        if source_domid == target_domid:
            raise errors.InvalidArgument(f"{source} cannot export a device to itself")
        mode = "r" if opts.read_only else "w"
        policy_source = await self.gate.name_of(source_domid)
        policy_target = await self.gate.name_of(target_domid)
        decision = self.gate.evaluate(
            "request-export", device.name, policy_source, policy_target, _pmode(mode)
        )
        self.gate.enforce(
            decision,
            "request-export",
            device.name,
            policy_source,
            policy_target,
            _pmode(mode),
            allow=(Action.ALLOW, Action.ASK),
            diskseq=device.diskseq,
        )
        # The VM must publish the device it names; checked now for a clear early answer, and
        # again in the transaction that writes the nodes.
        await self._xs(check_published_now, self.exporter.xenstore, source_domid, device)
        if len(self.pending) >= MAX_PENDING:
            raise errors.Busy(f"{MAX_PENDING} requests are pending already; try again later")
        if sum(r.source_domid == source_domid for r in self.pending.values()) >= (
            MAX_PENDING_PER_SOURCE
        ):
            raise errors.Busy(
                f"{source} has {MAX_PENDING_PER_SOURCE} requests pending already; wait for them"
            )
        caller = audit.CALLER.get()
        now = _now_us()
        req = PendingRequest(
            number=self._next,
            source=source,
            source_domid=source_domid,
            target=target,
            target_domid=target_domid,
            device=device,
            mode=mode,
            created_us=now,
            expires_us=now + opts.expiry_s * 1_000_000,
            requester=caller.bus_name if caller else "",
            location=decision.location or "",
        )
        self._next += 1
        if decision.action is Action.ALLOW:
            # Decided by a rule: export now. The object still appears (already approved, with
            # BackendPath and Devid) and goes at once, so a requester watching the
            # ObjectManager signals sees the same sequence as for a person's approval.
            req.state = STATE_APPROVING
            req.backend_path, req.devid = await self._write(
                source_domid, target_domid, device, mode
            )
            req.state = STATE_APPROVED
            self.pending[req.number] = req
            self.listener.request_added(req)
            self._finish(req, STATE_APPROVED, f"rule {req.location}", backend=req.backend_path)
            return req.object_path
        self.pending[req.number] = req
        req.timer = asyncio.get_running_loop().call_later(opts.expiry_s, self._expire, req)
        logfmt.info(
            "request pending",
            request=req.object_path,
            source=source,
            target=target,
            device=device.name,
            dev=f"{device.major}:{device.minor}",
            diskseq=device.diskseq,
            mode=mode,
            expires_in_s=opts.expiry_s,
        )
        self.listener.request_added(req)
        return req.object_path

    async def _write(
        self, source_domid: int, target_domid: int, device: DeviceDescriptor, mode: str
    ) -> tuple[str, int]:
        """Write the vbd: backend = the source VM (params=/dev/NAME), frontend = the target.
        Returns (backend path, devid)."""
        dev_path = f"/dev/{device.name}"
        phys = PhysicalDevice(device.major, device.minor, dev_path, device.diskseq)
        spec = VbdSpec(source_domid, target_domid, dev_path, mode, phys)
        devid = await self._xs(write_vm_vbd, self.exporter.xenstore, spec, source_domid, device)
        be_path = spec.backend_dir(devid)
        logfmt.info(
            "exported",
            source=f"domid {source_domid}:{dev_path}",
            backend=be_path,
            device=f"{device.major}:{device.minor}",
            diskseq=device.diskseq,
            mode=mode,
        )
        return be_path, devid

    # -- Request methods --------------------------------------------------------------------

    def lookup(self, untrusted_path: object) -> PendingRequest:
        m = REQUEST_PATH_RE.fullmatch(untrusted_path) if isinstance(untrusted_path, str) else None
        number = int(m[1]) if m else 0
        req = self.pending.get(number)
        if req is not None:
            if req.state == STATE_PENDING and _now_us() >= req.expires_us:
                self._finish(req, STATE_EXPIRED, "expiry")
                raise errors.Expired(f"request {number} expired; the VM must ask again")
            return req
        final = self._finished.get(number)
        if final == STATE_EXPIRED:
            raise errors.Expired(f"request {number} expired; the VM must ask again")
        if final is not None:
            raise errors.NotFound(f"request {number} is no longer pending (it was {final})")
        raise errors.NotFound(f"no request at {untrusted_path!s:.200}")

    def _claim(self, req: PendingRequest) -> None:
        if req.state != STATE_PENDING:
            raise errors.NotFound(f"request {req.number} is being decided already ({req.state})")

    async def approve(self, untrusted_path: object) -> None:
        req = self.lookup(untrusted_path)
        self._claim(req)
        req.state = STATE_APPROVING
        who = _person()
        # The policy may have changed since the request was made: it must still allow or ask.
        decision = self.gate.evaluate(
            "request-export", req.device.name, req.source, req.target, req.policy_mode
        )
        try:
            self.gate.enforce(
                decision,
                "request-export",
                req.device.name,
                req.source,
                req.target,
                req.policy_mode,
                allow=(Action.ALLOW, Action.ASK),
                diskseq=req.device.diskseq,
            )
            be_path, devid = await self._write(
                req.source_domid, req.target_domid, req.device, req.mode
            )
        except Exception as e:
            req.error = e.name if isinstance(e, errors.PolicydError) else "Internal"
            self._finish(req, STATE_FAILED, who, error=req.error)
            raise
        req.backend_path, req.devid = be_path, devid
        self._finish(req, STATE_APPROVED, who, backend=be_path, devid=devid)

    async def deny(self, untrusted_path: object) -> None:
        req = self.lookup(untrusted_path)
        self._claim(req)
        self._finish(req, STATE_DENIED, _person())

    async def withdraw(self, untrusted_path: object) -> None:
        req = self.lookup(untrusted_path)
        caller = audit.CALLER.get()
        if caller is None or (caller.uid != 0 and caller.bus_name != req.requester):
            raise errors.AccessDenied(
                f"only the connection that made request {req.number} (or root) may withdraw it"
            )
        self._claim(req)
        self._finish(req, STATE_WITHDRAWN, "requester")

    def requester_gone(self, bus_name: str) -> None:
        """The bridge that made these requests disconnected (the VM's call ended): withdraw."""
        for req in list(self.pending.values()):
            if req.requester == bus_name and req.state == STATE_PENDING:
                self._finish(req, STATE_WITHDRAWN, "requester disconnected")

    def _expire(self, req: PendingRequest) -> None:
        if self.pending.get(req.number) is req and req.state == STATE_PENDING:
            self._finish(req, STATE_EXPIRED, "expiry")

    def _finish(self, req: PendingRequest, state: str, decided_by: str, **extra: object) -> None:
        """Final state: audit it, tell watchers (PropertiesChanged), remove the object."""
        req.state = state
        if req.timer is not None:
            req.timer.cancel()
        self.pending.pop(req.number, None)
        self._finished[req.number] = state
        while len(self._finished) > MAX_TOMBSTONES:
            self._finished.popitem(last=False)
        audit.audit(
            state,
            operation="request-export",
            request=req.object_path,
            requester=req.requester,
            device=req.device.name,
            dev=f"{req.device.major}:{req.device.minor}",
            diskseq=req.device.diskseq,
            source=req.source,
            target=req.target,
            mode=req.mode,
            decided_by=decided_by,
            **extra,
        )
        self.listener.request_changed(req, ["State", "BackendPath", "Devid", "Error"])
        self.listener.request_removed(req)

    def shutdown(self) -> None:
        for req in list(self.pending.values()):
            self._finish(req, STATE_WITHDRAWN, "policyd stopping")


def _pmode(mode: str) -> str:
    return "rw" if mode == "w" else "ro"


def _person() -> str:
    caller = audit.CALLER.get()
    return "person " + ("unknown" if caller is None else str(caller))
