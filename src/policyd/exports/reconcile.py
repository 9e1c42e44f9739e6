"""Start-up reconciliation: the fds systemd kept, the backends XenStore names, made one again.

Unprivileged policyd code; runs once, before policyd takes its bus name; at run time, one
backend and one fd at a time (resolve_kept), for an fd kept after a commit of unknown
outcome. What it trusts: the fd store's fds (systemd kept them for policyd) re-identified by
the broker (device number, diskseq, backing file), and the tags policyd wrote in backend dirs
(policyd.xenstore.store.ExportTag), parsed strictly. For every tagged backend:
  - an fd vouches for its device (same major:minor and diskseq): adopted, with its number,
    source, mode and state (registry, sharing, exclusion, D-Bus object, watches);
  - no fd (no service manager, `systemctl stop` + `start` on systemd 252, a crash before the
    push): the device is re-opened by number through the broker with the diskseq XenStore
    names; if it is still there and the same, it is adopted and held again;
  - otherwise (gone, another diskseq, nodes not as policyd writes them, a sharing conflict):
    in a libxl backend the trio and the tag are removed and hotplug-error says why; a vbd
    policyd wrote itself (Export's, a VM's device) is removed whole. Either way blkback can
    never open a device other than the one written; logged and audited.
Stored fds that no backend names are removed from the store and closed. Numbers go on after the
highest given out, so an object path never names another export after a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from policyd import audit, errors, logfmt, modes
from policyd.brokerclient import Identity
from policyd.exports import identity
from policyd.exports.custody import FDNAME_PREFIX
from policyd.exports.exporter import NO_FD, Exporter, backing_name
from policyd.exports.identity import NO_NAMES
from policyd.exports.registry import Backing, BackingKey, ExportRecord, block_key, file_key
from policyd.exports.sources import device_path
from policyd.xenstore.store import ExportTag, ManagedBackend, PhysicalDevice, VbdSpec

DEVICE_PATH_PREFIX = "/dev/"
BROKER_WAIT_S = 60.0  # how long start-up waits for an unavailable broker before it gives up
BROKER_RETRY_S = 0.5
DeviceKey = tuple[int, int, int]  # major, minor, diskseq
T = TypeVar("T")


@dataclass
class Summary:
    """What reconciliation did; logged, and shown by `make demo` and the tests."""

    stored_fds: int = 0
    adopted: int = 0
    reopened: int = 0
    failed: list[str] = field(default_factory=list)
    released_fds: int = 0


async def reconcile(exporter: Exporter, stored: list[tuple[int, str]]) -> Summary:
    summary = Summary(stored_fds=len(stored))
    held = await _identify(exporter, stored, summary)
    xenstore = exporter.xenstore
    home = exporter.backend_domid
    backends = sorted(await xenstore.managed_backends(home), key=lambda b: b.number or 1 << 40)
    last = max([await xenstore.read_counter(home, "export"), *(b.number for b in backends)])
    exporter.registry.resume_numbers(last)
    names = await xenstore.domain_names() if backends else {}
    backings: dict[DeviceKey, Backing] = {}
    for be in backends:
        await adopt_backend(exporter, be, held, backings, names, summary)
    used = {b.fd for b in backings.values()}
    for fd, name, _ in held.values():
        if fd not in used:
            exporter.custody.adopt(name, fd)
            exporter.custody.release(name)
            summary.released_fds += 1
    logfmt.info(
        "reconciled",
        stored_fds=summary.stored_fds,
        adopted=summary.adopted,
        reopened=summary.reopened,
        failed=len(summary.failed),
        released_fds=summary.released_fds,
    )
    return summary


async def adopt_backend(
    exporter: Exporter,
    be: ManagedBackend,
    held: dict[DeviceKey, tuple[int, str, Identity]],
    backings: dict[DeviceKey, Backing],
    names: dict[int, str],
    summary: Summary,
) -> bool:
    """Reconcile one tagged backend: adopted (True) with the fd in `held` that vouches for
    its device, or re-opened; or failed (False): its nodes are removed (_fail). Start-up runs
    it for every backend; at run time Exporter.resolve_unknown runs it, under the exporter's
    lock, for the backend a commit of unknown outcome wrote."""
    try:
        backing = await _backing_for(exporter, be, held, backings, summary)
        _check_sharing(exporter, be, backing)
    except errors.PolicydError as e:
        await _fail(exporter, be, e, summary)
        return False
    record = ExportRecord(
        number=be.number or exporter.registry.next_number(),
        source=be.source,
        backing=backing,
        backend_domid=be.backend_domid,
        backend_domain=names.get(be.backend_domid, ""),
        frontend_domid=be.frontend_domid,
        frontend_domain=names.get(be.frontend_domid, ""),
        devid=be.devid,
        backend_path=be.path,
        mode=be.mode,
        since_us=be.since_us,
        wrote_vbd=be.kind != "attach",
    )
    if not be.number:  # untagged (a version before tags): numbered now, and tagged
        since = time.time_ns() // 1000
        tag = ExportTag(record.number, be.kind, be.source, exporter.backend_domid, since)
        await exporter.xenstore.write_tag(be.path, tag)
        record.since_us = since
    await exporter.adopt(record)
    summary.adopted += 1
    return True


async def resolve_kept(exporter: Exporter, number: int, name: str, ident: Identity) -> str:
    """Run time, under the exporter's lock: the fd `name` (device `ident`) was kept after the
    commit of export `number` had an unknown outcome. XenStore is read again: if the commit
    landed (a backend tagged `number` whose trio names this device and diskseq) the export is
    adopted as start-up would ("adopted"; "failed" if it cannot be: its nodes are removed and
    the fd released); if not, nothing names the device and the fd is released ("released").
    "kept": a new export of the same device holds it under the same name; the next start
    reconciles it.
    XenStoreError propagates: the caller retries, the fd stays kept."""
    if any(backing_name(r.backing) == name for r in exporter.registry):
        return "kept"  # an export opened the device again meanwhile: its fd is the one stored
    backends = await exporter.xenstore.managed_backends(exporter.backend_domid)
    key: DeviceKey = (ident.major, ident.minor, ident.diskseq)
    mine = [b for b in backends if b.number == number and b.kind != "vm"]
    outcome = "released"
    # the trio names this major:minor: adopted if the diskseq and nodes are as written, else
    # failed (its nodes removed) before the fd goes
    if mine and (mine[0].major, mine[0].minor) == key[:2]:
        names = await exporter.xenstore.domain_names()
        held = {key: (exporter.custody.held[name], name, ident)}
        backings: dict[DeviceKey, Backing] = {}
        if await adopt_backend(exporter, mine[0], held, backings, names, Summary()):
            return "adopted"
        outcome = "failed"
    exporter.custody.release(name)
    return outcome


async def _identify(
    exporter: Exporter, stored: list[tuple[int, str]], summary: Summary
) -> dict[DeviceKey, tuple[int, str, Identity]]:
    """The stored fds by device; fds that are not policyd's, or a second fd of a device, are
    closed (and removed from the store)."""
    held: dict[DeviceKey, tuple[int, str, Identity]] = {}
    for fd, name in stored:
        ident = None
        if name.startswith(FDNAME_PREFIX + "-"):
            ident = await _broker(exporter, "a stored fd", _identify_call(exporter, fd))
        key = None if ident is None else (ident.major, ident.minor, ident.diskseq)
        if key is not None and key in held and held[key][1] == name:
            os.close(fd)  # a second copy under the same name: the store keeps the first
            summary.released_fds += 1
            continue
        if ident is None or key is None or key in held:
            exporter.custody.adopt(name, fd)
            exporter.custody.release(name)  # not policyd's, or another name for a held device
            summary.released_fds += 1
            continue
        held[key] = (fd, name, ident)
    return held


def _identify_call(exporter: Exporter, fd: int) -> Callable[[], Awaitable[Identity]]:
    return lambda: exporter.broker.client.identify(fd)


async def _broker(exporter: Exporter, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """A broker request at start-up. An unavailable broker is waited for (socket activation
    starts it; a restarting one comes back): failing a backend for that would remove nodes
    that name a good device, and exiting at once would burn policyd's restarts. After
    BROKER_WAIT_S it is BrokerUnavailable, which ends start-up (the fd store keeps the fds)."""
    deadline = time.monotonic() + BROKER_WAIT_S
    while True:
        try:
            return await exporter.broker(what, call)
        except errors.BrokerUnavailable as e:
            if time.monotonic() > deadline:
                raise StartupAbort(str(e)) from None
            logfmt.warning("the broker is unavailable at start-up; waiting", what=what)
            await asyncio.sleep(BROKER_RETRY_S)


class StartupAbort(Exception):
    """Reconciliation cannot go on (the broker stays unavailable): policyd exits and keeps
    nothing it could not vouch for; the fd store keeps the fds for the next start."""


async def _backing_for(
    exporter: Exporter,
    be: ManagedBackend,
    held: dict[DeviceKey, tuple[int, str, Identity]],
    backings: dict[DeviceKey, Backing],
    summary: Summary,
) -> Backing:
    if be.problem:
        raise errors.DeviceChanged(be.problem)
    key: DeviceKey = (be.major, be.minor, be.diskseq)
    if key in backings:
        return backings[key]
    writable = modes.is_writable(be.mode)
    if be.kind == "vm":  # a VM's own device: policyd holds no fd (see Exporter.export_foreign)
        ident = Identity(be.major, be.minor, be.diskseq, 0, 0, 0)
        vm_key: BackingKey = (f"dom{be.backend_domid}", be.major, be.minor)
        backing = exporter.registry.new_backing(vm_key, NO_FD, ident, "vm", writable)
        backings[key] = backing
        return backing
    if key in held:
        fd, name, ident = held[key]
    else:
        fd, ident = await _reopen(exporter, be, writable)
        name = ""
        summary.reopened += 1
    kind = "file" if ident.backing_ino else "block"
    main_key = block_key(be.major, be.minor)
    aliases: tuple[BackingKey, ...] = ()
    if kind == "file":
        main_key, aliases = file_key(ident.backing_dev, ident.backing_ino), (main_key,)
    # a block device's names, re-read from sysfs for its properties (its identity is the
    # major:minor and diskseq the tag pinned, checked above)
    names = identity.names_or_empty(ident.major, ident.minor) if kind == "block" else NO_NAMES
    backing = exporter.registry.new_backing(
        main_key, fd, ident, kind, writable, aliases, device_path(ident), names
    )
    if name == backing_name(backing):
        exporter.custody.adopt(name, fd)
    elif name:  # stored under another name (kept after a commit of unknown outcome)
        exporter.custody.rename(name, backing_name(backing), fd)
    else:  # re-opened
        exporter.custody.hold(backing_name(backing), fd)
    backings[key] = backing
    return backing


async def _reopen(exporter: Exporter, be: ManagedBackend, writable: bool) -> tuple[int, Identity]:
    """The degraded path: no fd vouches for the device; re-open it by its node through the
    broker, which checks major:minor and diskseq (DeviceChanged or NotFound if not)."""
    path = be.device_path
    if not path.startswith(DEVICE_PATH_PREFIX) or "/" in path[len(DEVICE_PATH_PREFIX) :]:
        raise errors.DeviceChanged(f"physical-device-path {path[:60]!r} is not a /dev node")
    client = exporter.broker.client
    fd, ident = await _broker(
        exporter,
        path,
        lambda: client.open_block(
            path,
            writable=writable,
            expect_dev=(be.major, be.minor),
            expect_diskseq=be.diskseq,
        ),
    )
    if ident.major == 7 and not ident.backing_ino:
        ident = await _broker(exporter, "the loop device", lambda: client.identify(fd))
    return fd, ident


def _check_sharing(exporter: Exporter, be: ManagedBackend, backing: Backing) -> None:
    """The rules Export and Attach keep: a read-write device is never shared."""
    if backing.users and (backing.writable or modes.is_writable(be.mode)):
        raise errors.Busy(
            f"{be.path} names a device another backend uses, and one of them is read-write"
        )


async def _fail(
    exporter: Exporter, be: ManagedBackend, error: errors.PolicydError, summary: Summary
) -> None:
    reason = f"{error.name}: {error.text}"
    text = (
        f"blockbroker: after a restart of policyd the device this backend named "
        f"({be.major:x}:{be.minor:x}, diskseq {be.diskseq:x}) could not be adopted: {reason}"
    )
    logfmt.warning("backend failed at start-up", backend=be.path, reason=reason)
    audit.audit(
        "failed",
        operation="reconcile",
        backend=be.path,
        device=f"{be.major}:{be.minor}",
        diskseq=be.diskseq,
        reason=reason,
        decided_by="policyd start-up",
    )
    try:
        if be.kind == "attach":  # libxl's dir: it shows hotplug-error and removes the dir
            await exporter.xenstore.fail_backend(be.path, text)
        else:  # a vbd policyd wrote: nobody else would remove it
            nothing = PhysicalDevice(0, 0, "", 0)
            spec = VbdSpec(be.backend_domid, be.frontend_domid, "", be.mode, nothing)
            await exporter.xenstore.remove_vbd(spec, be.devid, exporter.backend_domid)
    except errors.XenStoreError as e:
        logfmt.error("cannot remove the nodes of a failed backend", backend=be.path, error=e)
    summary.failed.append(be.path)
