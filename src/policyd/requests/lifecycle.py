"""VM export requests: policy, pending requests, approval, expiry, withdrawal.

Unprivileged policyd code. The request comes from a VM through the qrexec bridge and is
untrusted: its device descriptor and options are validated by policyd.requests.vmdevice before
anything else here uses them. The source domain comes from qrexec (QREXEC_REMOTE_DOMAIN, passed
by the bridge), never from the VM's payload; only root and the bridge's group reach
RequestExport (policyd.bus.authz). Approve/Deny are polkit-gated
(org.qubes.blockbroker.approve) by policyd.bus before they get here. Every final state is
audited (policyd.audit). Request numbers go on after the last one given out, also across
restarts (a node of policyd's home domain); pending requests do not survive a restart (the
bridge answers Unavailable and the VM asks again). See docs/requests.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from typing import Protocol

from policyd import audit, errors, logfmt, modes, validate
from policyd.brokerclient import Identity
from policyd.exports.exporter import Exporter
from policyd.names import REQUEST_PATH_RE, number_in
from policyd.policy import Action
from policyd.policygate import PolicyGate
from policyd.requests.model import (
    STATE_APPROVED,
    STATE_APPROVING,
    STATE_DENIED,
    STATE_EXPIRED,
    STATE_FAILED,
    STATE_PENDING,
    STATE_WITHDRAWN,
    PendingRequest,
)
from policyd.requests.vmdevice import (
    check_published_now,
    device_descriptor,
    request_options,
    write_vm_vbd,
)
from policyd.xenstore.store import ExportTag, PhysicalDevice, VbdSpec, XenStore

DEFAULT_EXPIRY_S = 300
MAX_EXPIRY_S = 86400
MAX_TOMBSTONES = 1024
MAX_PENDING = 256  # all VMs together; a flood of requests cannot grow policyd without bound
MAX_PENDING_PER_SOURCE = 16  # one VM cannot crowd out the others' requests


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
        *,
        exporter: Exporter,
        xenstore: XenStore,
        gate: PolicyGate,
        listener: Listener,
        home: int = 0,
        expiry_s: int = DEFAULT_EXPIRY_S,
    ) -> None:
        self.exporter = exporter
        self.xenstore = xenstore
        self.gate = gate
        self.listener = listener
        self.expiry_s = expiry_s
        self.home = home
        self.pending: dict[int, PendingRequest] = {}
        self._finished: OrderedDict[int, str] = OrderedDict()  # number -> final state
        self._next = 1

    async def load_counter(self) -> None:
        """Start-up: request numbers go on from the last one given out (a node of policyd's
        home domain), so a number never names another request after a restart."""
        self._next = await self.xenstore.read_counter(self.home, "request") + 1

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
        source_domid, target_domid = await self.xenstore.find_domains([source, target])
        if source_domid == 0:
            raise errors.InvalidArgument("the source of a request is a VM, never dom0")
        if source_domid == target_domid:
            raise errors.InvalidArgument(f"{source} cannot export a device to itself")
        mode = modes.from_read_only(opts.read_only)
        policy_source = await self.gate.name_of(source_domid)
        policy_target = await self.gate.name_of(target_domid)
        decision = self.gate.evaluate(
            "request-export", device.name, policy_source, policy_target, modes.policy_mode(mode)
        )
        self.gate.enforce(
            decision,
            "request-export",
            device.name,
            policy_source,
            policy_target,
            modes.policy_mode(mode),
            allow=(Action.ALLOW, Action.ASK),
            diskseq=device.diskseq,
        )
        # The VM must publish the device it names; checked now for a clear early answer, and
        # again in the transaction that writes the nodes.
        await check_published_now(self.xenstore, source_domid, device)
        if len(self.pending) >= MAX_PENDING:
            raise errors.Busy(f"{MAX_PENDING} requests are pending already; try again later")
        if sum(r.source_domid == source_domid for r in self.pending.values()) >= (
            MAX_PENDING_PER_SOURCE
        ):
            raise errors.Busy(
                f"{source} has {MAX_PENDING_PER_SOURCE} requests pending already; wait for them"
            )
        caller = audit.CALLER.get()
        number = self._next
        self._next += 1
        await self.xenstore.write_counter(self.home, "request", number)
        now = _now_us()
        req = PendingRequest(
            number=number,
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
        if decision.action is Action.ALLOW:
            # Decided by a rule: export now. The object still appears (already approved, with
            # BackendPath and Devid) and goes at once, so a requester watching the
            # ObjectManager signals sees the same sequence as for a person's approval.
            req.state = STATE_APPROVING
            await self._write(req)
            req.state = STATE_APPROVED
            self.pending[req.number] = req
            self.listener.request_added(req)
            self._finish(
                req,
                STATE_APPROVED,
                f"rule {req.location}",
                export=req.export,
                backend=req.backend_path,
            )
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

    async def _write(self, req: PendingRequest) -> None:
        """Write the vbd: backend = the source VM (params=/dev/NAME), frontend = the target;
        register it as an export (listed, detachable). Sets the request's Export,
        BackendPath and Devid."""
        device = req.device
        dev_path = f"/dev/{device.name}"
        phys = PhysicalDevice(device.major, device.minor, dev_path, device.diskseq)
        spec = VbdSpec(req.source_domid, req.target_domid, dev_path, req.mode, phys)
        ident = Identity(device.major, device.minor, device.diskseq, device.size, 0, 0)

        async def write_nodes(tag: ExportTag) -> int:
            tagged = dataclasses.replace(spec, tag=tag)
            return await write_vm_vbd(self.xenstore, tagged, req.source_domid, device)

        record = await self.exporter.export_foreign(
            f"{req.source}:{dev_path}",
            ident,
            (req.source_domid, req.source),
            (req.target_domid, req.target),
            req.mode,
            write_nodes,
        )
        req.export, req.backend_path, req.devid = (
            record.object_path,
            record.backend_path,
            record.devid,
        )

    # -- Request methods --------------------------------------------------------------------

    def lookup(self, untrusted_path: object) -> PendingRequest:
        number = number_in(REQUEST_PATH_RE, untrusted_path) or 0
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
            await self._write(req)
        except Exception as e:
            req.error = e.name if isinstance(e, errors.PolicydError) else "Internal"
            self._finish(req, STATE_FAILED, who, error=req.error)
            raise
        self._finish(
            req, STATE_APPROVED, who, export=req.export, backend=req.backend_path, devid=req.devid
        )

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

    def _finish(
        self,
        req: PendingRequest,
        state: str,
        decided_by: str,
        *,
        notify: bool = True,
        **extra: object,
    ) -> None:
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
        if notify:
            self.listener.request_changed(req, ["State", "Export", "BackendPath", "Devid", "Error"])
            self.listener.request_removed(req)

    def shutdown(self) -> None:
        """Audited as withdrawn; requesters are not told by a signal: they see policyd leave the
        bus (the bridge answers Unavailable, not as if the request had been withdrawn)."""
        for req in list(self.pending.values()):
            self._finish(req, STATE_WITHDRAWN, "policyd stopping", notify=False)


def _person() -> str:
    caller = audit.CALLER.get()
    return "person " + ("unknown" if caller is None else str(caller))
