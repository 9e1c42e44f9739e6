"""Export, attach and detach: the operations, and custody of the fds they hold.

Unprivileged policyd code; arguments arrive already validated by policyd.bus.service, and
XenStore content is validated by policyd.xenstore. The broker decides what may be opened at all;
policyd.exports.sources opens (through it) and decides sharing; this module writes the nodes,
registers the exports and holds their fds. Every operation runs under one asyncio lock, so
registry checks and the XenStore/broker steps that follow cannot interleave. A failed operation
undoes what it did (ExitStack, handed over with pop_all() only on success): no fd, node or loop
device is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from policyd import errors, logfmt, modes, validate
from policyd.brokerclient import Identity
from policyd.exports import identity
from policyd.exports.blkback import BlkbackWatcher
from policyd.exports.brokercalls import BrokerCalls
from policyd.exports.custody import Custody, fd_name
from policyd.exports.frontends import FrontendWatch
from policyd.exports.preattach import AT_DIR, ONLINE, PRE_ATTACH_TOKEN, BackendWatch
from policyd.exports.registry import (
    STATE_BACKEND_IN_VM,
    STATE_CONNECTED,
    Backing,
    BackingKey,
    ExportRecord,
    Registry,
)
from policyd.exports.sources import Sources, physical
from policyd.xenstore.store import (
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CONNECTED,
    BackendNodes,
    ExportTag,
    VbdSpec,
    XenStore,
    backend_dir,
)

T = TypeVar("T")
CLOSE_WAIT_S = 5.0  # how long Detach waits for a connected blkback to close the device
CLOSE_POLL_S = 0.05
# a backend whose `script` node names this file is pre-attached (policyd.exports.preattach)
PRE_ATTACH_SCRIPT = "blockbroker-block"
# how long a pre-attached export waits for its script's Attach before it is released: libxl
# spawns the script within its device-init timeout (10 s) of writing the nodes
DEFAULT_CLAIM_S = 60.0
# an Attach export whose backend dir is gone with no Detach (libxl deletes the dir after a
# `remove` that failed or was killed, or the script never ran) is detached after this long: a
# Detach that comes right after the deletion still gets its own answer
GONE_GRACE_S = 2.0
# an fd kept after a commit of unknown outcome is resolved once XenStore answers again: first
# try after RESOLVE_FIRST_S (the dropped connection's commit, if xenstored got it, is applied
# by then), pauses doubling up to RESOLVE_MAX_PAUSE_S, given up after RESOLVE_WAIT_S (the fd
# stays kept, in the fd store, and the next start reconciles it)
RESOLVE_FIRST_S = 0.2
RESOLVE_MAX_PAUSE_S = 5.0
RESOLVE_WAIT_S = 60.0
NO_FD = -1  # a device in another domain (a VM's own, through a request): policyd holds no fd
Domain = tuple[int, str]  # domid, and its name as read from XenStore ("" if it has none)
# (operation, dom0 path, backend, frontend, writable) -> None, or PolicyDenied
PolicyCheck = Callable[[str, str, Domain, Domain, bool], Awaitable[None]]
# (exporter, export number, fd name, device) -> outcome: policyd.exports.reconcile.resolve_kept,
# given by policyd.main (reconcile builds on this module, so this module cannot import it)
Resolver = Callable[["Exporter", int, str, Identity], Awaitable[str]]


class Listener(Protocol):
    """What the D-Bus layer does when the registry changes."""

    def export_added(self, record: ExportRecord) -> None: ...
    def export_removed(self, record: ExportRecord) -> None: ...
    def export_changed(self, record: ExportRecord, names: list[str]) -> None: ...
    def export_count_changed(self, count: int) -> None: ...


class Exporter:
    """The export operations (Export, ExportFd, Attach, Detach, a VM's approved export) and
    the fds they hold (policyd.exports.custody: also in systemd's fd store): in the registry
    while an export uses them, or held on while XenStore may still name their device after a
    failure (a commit of unknown outcome, a trio that could not be removed)."""

    def __init__(
        self,
        *,
        xenstore: XenStore,
        broker: BrokerCalls,
        registry: Registry,
        sources: Sources,
        policy_check: PolicyCheck,
        listener: Listener,
        custody: Custody,
        backend_domid: int,
        sysfs_root: str,
        claim_s: float | None = DEFAULT_CLAIM_S,  # None: no pre-attach
        resolver: Resolver | None = None,  # None: kept fds wait for the next start
    ) -> None:
        self.xenstore = xenstore
        self.broker = broker
        self.registry = registry
        self.sources = sources
        self.policy_check = policy_check
        self.listener = listener
        self.backend_domid = backend_domid
        self.custody = custody
        self.blkback = BlkbackWatcher(sysfs_root, self._state_changed)
        self.frontends = FrontendWatch(xenstore, self._frontend_gone)
        self.backends = BackendWatch(backend_domid, self._backend_event, self._subtree_event)
        self.claim_s = claim_s
        self.resolver = resolver
        # pre-attached exports no script's Attach has claimed yet: backend path -> release timer
        self.unclaimed: dict[str, asyncio.TimerHandle] = {}
        # when a pre-attach's trio commit was sent (time.monotonic()), until its claim
        self._checked_at: dict[str, float] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # Attach exports whose backend dir may be gone: backend path -> check timer
        self._gone_checks: dict[str, asyncio.TimerHandle] = {}
        self._resolving: set[asyncio.Task[str]] = set()  # fds kept after unknown commits
        self._lock = asyncio.Lock()

    def shutdown(self) -> None:
        for task in self._resolving:
            task.cancel()  # their fds stay in the store: the next start reconciles them
        self.backends.stop()
        for handle in [*self.unclaimed.values(), *self._gone_checks.values()]:
            handle.cancel()
        self.frontends.stop()
        self.custody.close_all()
        self.blkback.stop()
        self.xenstore.close()
        self.broker.close()

    async def _publish(
        self, undo: contextlib.ExitStack, backing: Backing, number: int, step: Awaitable[T]
    ) -> T:
        """Run the step that names a device in XenStore (its commit) for export `number`. Once
        it succeeded, the fds in `undo` are held whatever happens next (a failure after it
        leaks, never frees). If the commit's outcome is unknown, or the step is cancelled
        while it may be in flight, XenStore may name the device now: closing its fd would let
        AUTOCLEAR free the number for reuse under that name (the race blockbroker exists to
        close). So a fresh backing's fd is held (in custody, so in the fd store), and the
        error is still reported. After CommitUnknown (its connection dropped) the fd is
        resolved as soon as XenStore answers again (resolve_unknown); after a cancel
        (policyd stopping) the next start reconciles it."""
        fresh = self._hold_fresh(backing, undo)
        try:
            result = await step
        except errors.CommitUnknown:
            undo.pop_all()  # held in custody (and the store) from now on
            logfmt.warning(
                "commit outcome unknown: keeping the device's fd",
                export_number=number,
                fd_name=backing_name(backing),
            )
            if fresh and self.resolver is not None:
                self._resolve_later(number, backing_name(backing), backing.identity)
            raise
        except asyncio.CancelledError:
            undo.pop_all()
            logfmt.warning("commit cancelled in flight: keeping the device's fd")
            raise
        undo.pop_all()
        return result

    def _resolve_later(self, number: int, name: str, ident: Identity) -> None:
        task = asyncio.get_running_loop().create_task(self.resolve_unknown(number, name, ident))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def resolve_unknown(self, number: int, name: str, ident: Identity) -> str:
        """The fd `name` was kept after export `number`'s commit had an unknown outcome: once
        XenStore answers, under the lock, the export is adopted if the commit landed or the fd
        released if not (self.resolver: policyd.exports.reconcile.resolve_kept). Retried with
        back-off while XenStore fails; after RESOLVE_WAIT_S the fd stays kept ("kept") for the
        next start. Returns the outcome, which is also logged."""
        assert self.resolver is not None  # only scheduled with one
        pause = RESOLVE_FIRST_S
        deadline = time.monotonic() + RESOLVE_WAIT_S
        tries = 0
        while True:
            await asyncio.sleep(pause)
            tries += 1
            async with self._lock:
                if name not in self.custody.held:
                    return "gone"  # released meanwhile (policyd stopping)
                try:
                    outcome = await self.resolver(self, number, name, ident)
                except errors.XenStoreError as e:
                    logfmt.warning(
                        "cannot resolve a commit of unknown outcome yet",
                        export_number=number, fd_name=name, tries=tries, error=e,
                    )  # fmt: skip
                except Exception as e:  # a task's last word: the fd stays kept
                    logfmt.error(
                        "resolving a commit of unknown outcome failed; the fd stays kept",
                        export_number=number, fd_name=name, error=repr(e),
                    )  # fmt: skip
                    return "kept"
                else:
                    logfmt.info(
                        "commit of unknown outcome resolved",
                        export_number=number, fd_name=name, outcome=outcome, tries=tries,
                    )  # fmt: skip
                    return outcome
            if time.monotonic() + pause > deadline:
                logfmt.warning(
                    "XenStore stays unavailable: the fd stays kept for the next start",
                    export_number=number, fd_name=name, tries=tries,
                )  # fmt: skip
                return "kept"
            pause = min(pause * 2, RESOLVE_MAX_PAUSE_S)

    def _hold_fresh(self, backing: Backing, undo: contextlib.ExitStack) -> bool:
        """A fresh backing's fd goes to the fd store before any node names its device, so a
        crash at any later point finds it there (start-up releases it if no node names it);
        if the step fails, `undo` takes it out of the store again before closing it. True if
        it was held here (False: shared, held already, or no fd)."""
        name = backing_name(backing)
        if backing.fd == NO_FD or backing.users or name in self.custody.held:
            return False
        self.custody.hold(name, backing.fd)
        undo.callback(self.custody.unhold, name)
        return True

    async def watch_backends(self) -> None:
        """Start-up, after reconciliation: watch the backend tree for libxl's new backends."""
        if self.claim_s is None:
            return
        try:
            await self.xenstore.watch(self.backends.root, PRE_ATTACH_TOKEN, self.backends.event)
        except errors.XenStoreError as e:
            logfmt.warning("cannot watch vbd backends; no pre-attach", error=e)

    async def probe(self) -> None:
        """Start-up: connect to XenStore (read the backend domain's name); errors are logged."""
        with contextlib.suppress(errors.PolicydError):
            await self.xenstore.domain_name(self.backend_domid)

    # -- operations ---------------------------------------------------------------------------

    async def export_path(
        self, path: str, frontend: str, opts: validate.ExportOptions
    ) -> ExportRecord:
        async with self._lock:
            self.custody.check_room()
            fe_domid, be_name = await self.xenstore.find_export_domains(
                frontend, self.backend_domid
            )
            backend = (self.backend_domid, be_name)
            judged, pinned = identity.policy_path(path, self.sources.sysfs_root)
            await self.policy_check(
                "export", judged, backend, (fe_domid, frontend), not opts.read_only
            )
            with contextlib.ExitStack() as undo:
                backing = await self.sources.open_path(
                    path, not opts.read_only, opts.direct_io, undo, opts.dm_uuid, pinned
                )
                return await self._export(path, backing, fe_domid, frontend, be_name, opts, undo)

    async def export_fd(self, fd: int, frontend: str, opts: validate.ExportOptions) -> ExportRecord:
        async with self._lock:
            with contextlib.ExitStack() as undo:
                undo.callback(os.close, fd)  # ours from here on; closed unless held
                self.custody.check_room()
                fe_domid, be_name = await self.xenstore.find_export_domains(
                    frontend, self.backend_domid
                )
                backing = await self.sources.adopt_fd(fd, not opts.read_only, opts.dm_uuid)
                if backing.fd != fd:
                    undo.close()  # a shared backing holds its own fd: the caller's is not needed
                await self.policy_check(
                    "export",
                    backing.device_path,
                    (self.backend_domid, be_name),
                    (fe_domid, frontend),
                    not opts.read_only,
                )
                source = f"fd:{backing.identity.major}:{backing.identity.minor}"
                return await self._export(source, backing, fe_domid, frontend, be_name, opts, undo)

    async def _export(
        self,
        source: str,
        backing: Backing,
        fe_domid: int,
        frontend: str,
        be_name: str,
        opts: validate.ExportOptions,
        undo: contextlib.ExitStack,
    ) -> ExportRecord:
        mode = modes.from_read_only(opts.read_only)
        number = self.registry.next_number()
        tag = ExportTag(number, "export", source, self.backend_domid, _now_us())
        spec = VbdSpec(self.backend_domid, fe_domid, source, mode, physical(backing), tag)
        devid = await self._publish(undo, backing, number, self.xenstore.add_vbd(spec, opts.devid))
        record = self._record(
            number,
            source,
            backing,
            fe_domid,
            frontend,
            devid,
            spec.backend_dir(devid),
            mode,
            be_name,
            wrote_vbd=True,
            since_us=tag.since_us,
        )
        self._register(record)
        await self.frontends.watch(fe_domid)
        return record

    def _own_backend_path(self, untrusted_path: str) -> validate.BackendPath:
        be = validate.backend_path(untrusted_path, self.backend_domid)
        if be.backend_domid != self.backend_domid:
            raise errors.InvalidArgument(
                f"{be.path} belongs to backend domain {be.backend_domid}; this policyd serves "
                f"backend domain {self.backend_domid}"
            )
        return be

    async def attach(self, untrusted_path: str) -> ExportRecord:
        be = self._own_backend_path(untrusted_path)
        asked = time.monotonic()  # the request is here: what it finds must be no older
        async with self._lock:
            existing = self.registry.by_backend_path(be.path)
            if existing is not None and self._checked_since(be.path, asked):
                self._claim(be.path)  # pre-attached, and checked after this request came
                return existing
            try:
                nodes, fe_name, be_name = await self.xenstore.read_backend(be)
            except errors.PolicydError:
                await self._unclaim(be.path, "the hotplug script's Attach failed")
                raise
            existing = self.registry.by_backend_path(be.path)
            if existing is not None:
                if still_attached(existing, nodes):
                    self._claim(be.path)
                    return existing  # called twice, or pre-attached: the same export
                if be.path in self.unclaimed:  # its trio is still there: removed with it
                    await self._unclaim(be.path, "the backend's nodes changed")
                else:
                    self._drop_stale(existing, nodes)
            return await self._attach_new(be, nodes, fe_name, be_name)

    async def _unclaim(self, be_path: str, why: str) -> None:
        """Detach the pre-attached, unclaimed export at `be_path`, if there is one: its
        script's Attach did not take it. The caller holds self._lock."""
        record = self.registry.by_backend_path(be_path)
        if be_path not in self.unclaimed or record is None:
            return
        self._claim(be_path)
        logfmt.warning(
            "releasing a pre-attached export", export=record.object_path, backend=be_path,
            reason=why,
        )  # fmt: skip
        await self._detach(record, status=True)

    async def _attach_new(
        self,
        be: validate.BackendPath,
        nodes: BackendNodes,
        fe_name: str,
        be_name: str,
        *,
        pre: bool = False,
    ) -> ExportRecord:
        """The body of Attach for a backend with no export; the caller holds self._lock.
        `pre`: a pre-attach, whose transaction's start is noted for its claim."""
        with contextlib.ExitStack() as undo:
            judged, pinned = identity.policy_path(nodes.params, self.sources.sysfs_root)
            await self.policy_check(
                "attach",
                judged,
                (be.backend_domid, be_name),
                (be.frontend_domid, fe_name),
                modes.is_writable(nodes.mode),
            )
            self.custody.check_room()
            # the trio's transaction starts while the broker opens the device
            async with self.xenstore.transaction_ahead() as ahead:
                backing = await self.sources.open_path(
                    nodes.params, modes.is_writable(nodes.mode), False, undo, pinned=pinned
                )
                number = self.registry.next_number()
                tag = ExportTag(number, "attach", nodes.params, self.backend_domid, _now_us())
                # once the trio is written, the fd is held
                phys = physical(backing)
                checked = await self._publish(
                    undo,
                    backing,
                    number,
                    self.xenstore.write_physical_device(be.path, phys, nodes, tag, ahead),
                )
            if pre:
                self._checked_at[be.path] = checked
            record = self._record(
                number,
                nodes.params,
                backing,
                be.frontend_domid,
                fe_name,
                be.devid,
                be.path,
                nodes.mode,
                be_name,
                wrote_vbd=False,
                since_us=tag.since_us,
            )
            self._register(record, announce_later=pre)
        return record

    # -- pre-attach (policyd.exports.preattach) -----------------------------------------------

    async def pre_attach(self, untrusted_path: str) -> ExportRecord | None:
        """libxl wrote a backend whose hotplug script is blockbroker-block: its Attach, now,
        before the script asks (which then gets this export). None when there is nothing to do:
        an export exists, the backend is gone or not blockbroker-block's, or it already names
        a device (someone else's). Errors are the caller's to log: the script's own Attach
        makes the same steps and reports their failure to libxl."""
        be = self._own_backend_path(untrusted_path)
        async with self._lock:
            if self.registry.by_backend_path(be.path) is not None:
                return None
            found = await self.xenstore.read_backend_if(be, PRE_ATTACH_SCRIPT)
            if found is None or found[0].physical_device:
                return None
            record = await self._attach_new(be, *found, pre=True)
            assert self.claim_s is not None  # only the watch calls this, and only if set
            self.unclaimed[be.path] = asyncio.get_running_loop().call_later(
                self.claim_s, self._claim_expired, be.path
            )
            logfmt.info("pre-attached", export=record.object_path, backend=be.path)
            return record

    def _claim(self, be_path: str) -> None:
        self._checked_at.pop(be_path, None)
        handle = self.unclaimed.pop(be_path, None)
        if handle is not None:
            handle.cancel()

    def _checked_since(self, be_path: str, asked: float) -> bool:
        """Whether the unclaimed pre-attach at `be_path` wrote its trio in a transaction whose
        commit was sent after `asked`. That transaction checked that the backend exists with
        the params and mode the export was made for and wrote its device; its commit succeeds
        only if none of that changed before it is applied, which is after it was sent. So
        the nodes were as the export needs (still_attached) at a moment after `asked`: what
        the script's Attach, which arrived at `asked`, would read itself. It gets the export
        without reading them again."""
        return be_path in self.unclaimed and self._checked_at.get(be_path, asked) > asked

    async def _backend_event(self, be_dir: str, flags: int) -> None:
        """BackendWatch: something changed below `be_dir` (flags: on the dir itself, on its
        `online` node)."""
        if be_dir in self.unclaimed and flags & AT_DIR:
            # created or removed; policyd's and blkback's writes are below it
            await self.release_unclaimed(be_dir, "its backend was removed", only_if_gone=True)
        record = self.registry.by_backend_path(be_dir)
        if record is not None:
            if not record.wrote_vbd:
                if flags & AT_DIR:
                    self._check_gone_later(be_dir)
                if flags & ONLINE:
                    await self._detach_offline(record)
            return  # claimed, or an Export's vbd
        if not flags & AT_DIR:
            return  # only a new backend (libxl makes its dir) is pre-attached, not one whose
            # trio a Detach just removed
        try:
            await self.pre_attach(be_dir)
        except errors.InvalidArgument:
            return  # not a disk's backend path (a devid that is no vbd's)

    async def _subtree_event(self, path: str) -> None:
        """An event on the tree's root (also the watch's first event, after reconciliation) or
        on a frontend's dir: whole backends below `path` may be gone."""
        for be_path in list(self.unclaimed):
            await self.release_unclaimed(be_path, "its backend was removed", only_if_gone=True)
        for record in list(self.registry):
            if not record.wrote_vbd and record.backend_path.startswith(path + "/"):
                self._check_gone_later(record.backend_path)

    def _check_gone_later(self, be_path: str) -> None:
        if be_path not in self._gone_checks:
            self._gone_checks[be_path] = asyncio.get_running_loop().call_later(
                GONE_GRACE_S, self._gone_check_due, be_path
            )

    def _gone_check_due(self, be_path: str) -> None:
        del self._gone_checks[be_path]
        task = asyncio.get_running_loop().create_task(self._release_gone(be_path))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_gone(self, be_path: str) -> None:
        """Detach the Attach export at `be_path` if its backend dir no longer exists: no
        script's Detach came (libxl deletes the dir after a `remove` that failed or was
        killed, and policyd may have been away when it ran). blkback lets go of a device when
        its backend goes; the loop device is freed on its last close."""
        try:
            async with self._lock:
                record = self.registry.by_backend_path(be_path)
                if record is None or record.wrote_vbd or await self.xenstore.exists(be_path):
                    return  # detached, or there (re-created: its Attach replaces the export)
                self._claim(be_path)
                logfmt.warning(
                    "backend removed without a Detach; detaching its export",
                    export=record.object_path,
                    backend=be_path,
                )
                await self._detach(record)
        except errors.PolicydError as e:
            logfmt.warning("detaching the export of a removed backend failed", backend=be_path,
                           error=e)  # fmt: skip

    async def _detach_offline(self, record: ExportRecord) -> None:
        """libxl began removing an Attach export's backend (online = 0): its Detach, now."""
        async with self._lock:
            if self.registry.get(record.number) is not record:
                return  # detached meanwhile
            status = record.backend_path in self.unclaimed
            try:
                if await self._detach(record, status=status, if_offline=True):
                    logfmt.info("libxl is removing the backend", backend=record.backend_path)
            except errors.XenStoreError as e:  # nothing changed: the script's Detach will
                logfmt.warning("pre-detach failed", backend=record.backend_path, error=e)

    def _claim_expired(self, be_path: str) -> None:
        why = f"no hotplug script claimed it in {self.claim_s:g} s"
        task = asyncio.get_running_loop().create_task(self._release_logged(be_path, why))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_logged(self, be_path: str, why: str) -> None:
        try:
            await self.release_unclaimed(be_path, why)
        except errors.PolicydError as e:
            logfmt.warning("releasing an unclaimed pre-attach failed", backend=be_path, error=e)

    async def release_unclaimed(self, be_path: str, why: str, only_if_gone: bool = False) -> None:
        """Detach a pre-attached export no script's Attach has claimed (with only_if_gone: if
        its backend dir no longer exists); nothing if it was claimed or detached meanwhile."""
        async with self._lock:
            if be_path not in self.unclaimed:
                return
            record = self.registry.by_backend_path(be_path)
            if record is None:
                self._claim(be_path)
                return
            if only_if_gone and await self.xenstore.exists(be_path):
                return
            await self._unclaim(be_path, why)

    def _drop_stale(self, record: ExportRecord, nodes: BackendNodes) -> None:
        """The backend directory was re-created (a new domain with the same domid and devid,
        after a remove that never reached policyd): XenStore no longer names the old export's
        device here, so it is dropped and the new nodes get a fresh Attach."""
        logfmt.warning(
            "stale export for a re-created backend; replacing it",
            export=record.object_path,
            backend=record.backend_path,
            old_source=record.source,
            source=nodes.params,
            physical_device=nodes.physical_device,
        )
        self._unregister(record)

    async def _frontend_gone(self, fe_domid: int) -> None:
        """FrontendWatch saw the domain go: detach the exports policyd wrote for it."""
        gone = [r for r in self.registry if r.wrote_vbd and r.frontend_domid == fe_domid]
        for record in gone:
            logfmt.info(
                "frontend domain gone: detaching its export",
                export=record.object_path,
                frontend=fe_domid,
            )
            try:
                await self.detach(record)
            except errors.PolicydError as e:
                logfmt.warning("detaching a dead frontend's export failed", error=e)

    async def detach_backend(self, untrusted_path: str) -> None:
        """libxl's remove. The export is looked up under the lock Attach holds, so a Detach
        that races a late Attach waits for it and detaches what it registered."""
        be = self._own_backend_path(untrusted_path)
        async with self._lock:
            record = self.registry.by_backend_path(be.path)
            if record is None:
                raise errors.NotFound(f"no export for {be.path}")
            await self._detach(record)

    async def detach(self, record: ExportRecord) -> None:
        async with self._lock:
            if self.registry.get(record.number) is not record:
                raise errors.NotFound(f"{record.object_path} is already detached")
            await self._detach(record)

    async def _detach(
        self, record: ExportRecord, status: bool = False, if_offline: bool = False
    ) -> bool:
        """The body of Detach; the caller holds self._lock. `status`: an Attach export's
        hotplug-status goes too (no hotplug script reported it: a pre-attach's). `if_offline`
        (an Attach export): only if its backend's `online` node is 0, checked in the
        transaction that removes the trio; False if it was not (nothing done)."""
        spec = VbdSpec(
            record.backend_domid,
            record.frontend_domid,
            "",
            record.mode,
            physical(record.backing),
        )
        if record.wrote_vbd:
            if record.state == STATE_CONNECTED or (
                record.state == STATE_BACKEND_IN_VM and await self._remote_connected(record)
            ):
                await self._wait_closed(record)
            await self.xenstore.remove_vbd(spec, record.devid, self.backend_domid)
        keep = False
        if not record.wrote_vbd:  # Attach's: libxl owns the dir, policyd only the trio
            try:
                if not await self.xenstore.remove_physical_device(
                    record.backend_path, status, if_offline=if_offline
                ):
                    return False
            except errors.XenStoreError as e:
                if if_offline and not isinstance(e, errors.CommitUnknown):
                    raise  # rolled back before `online` was seen to be 0: nothing changed
                # libxl removes the backend dir itself (libxl's remove must not fail over
                # it), but until then the trio may still name the device: its fd is kept
                logfmt.warning(
                    "could not remove physical-device nodes; keeping the device's fd",
                    path=record.backend_path,
                    error=e,
                )
                keep = True
        released = self._unregister(record, keep_fd=keep)
        logfmt.info(
            "detached",
            export=record.object_path,
            backend=record.backend_path,
            released=released,
        )
        return True

    async def export_foreign(
        self,
        source: str,
        identity: Identity,
        backend: tuple[int, str],
        frontend: tuple[int, str],
        mode: str,
        write_nodes: Callable[[ExportTag], Awaitable[int]],
    ) -> ExportRecord:
        """Register an export of a device in another domain (a VM's own device, approved
        through policyd.requests): policyd holds no fd, the backend domain's blkback opens it;
        it is listed and detached like any export. `write_nodes(tag)` writes the vbd with its
        tag in one transaction and returns the devid; nothing is registered if it raises. The
        backing key names the domain, so it never matches dom0's own devices."""
        (be_domid, be_name), (fe_domid, fe_name) = backend, frontend
        key: BackingKey = (f"dom{be_domid}", identity.major, identity.minor)
        async with self._lock:
            shared = self.registry.shareable(key, modes.is_writable(mode))
            number = self.registry.next_number()
            tag = ExportTag(number, "vm", source, self.backend_domid, _now_us())
            devid = await write_nodes(tag)
            backing = shared or self.registry.new_backing(
                key, NO_FD, identity, "vm", modes.is_writable(mode)
            )
            be_path = backend_dir(be_domid, fe_domid, devid)
            record = self._record(
                number,
                source,
                backing,
                fe_domid,
                fe_name,
                devid,
                be_path,
                mode,
                be_name,
                wrote_vbd=True,
                since_us=tag.since_us,
                be_domid=be_domid,
            )
            self._register(record)
            await self.frontends.watch(fe_domid)
            return record

    async def _remote_connected(self, record: ExportRecord) -> bool:
        """A VM's blkback is invisible in dom0's sysfs; its backend state node tells."""
        state = await self.xenstore.read_one(f"{record.backend_path}/state")
        return state == str(XENBUS_STATE_CONNECTED)

    async def _wait_closed(self, record: ExportRecord) -> None:
        """Ask blkback to disconnect; go on once the backend is Closed or blkback has let go of
        the device (its sysfs node is gone), or after CLOSE_WAIT_S (a guest that ignores the
        request then loses the disk when the nodes go, as with `xl block-detach --force`)."""
        be_path = record.backend_path
        await self.xenstore.set_backend_closing(be_path)
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            state = await self.xenstore.read_one(f"{be_path}/state")
            if state in (None, str(XENBUS_STATE_CLOSED)):
                return
            if record.state != STATE_BACKEND_IN_VM and not self.blkback.holds(record):
                return
            await asyncio.sleep(CLOSE_POLL_S)
        logfmt.warning("backend did not reach Closed; removing its nodes anyway", path=be_path)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _record(
        self,
        number: int,
        source: str,
        backing: Backing,
        fe_domid: int,
        fe_name: str,
        devid: int,
        be_path: str,
        mode: str,
        be_name: str,
        *,
        wrote_vbd: bool,
        since_us: int,
        be_domid: int | None = None,  # another domain's backend (a VM's own device)
    ) -> ExportRecord:
        return ExportRecord(
            number=number,
            source=source,
            backing=backing,
            backend_domid=self.backend_domid if be_domid is None else be_domid,
            backend_domain=be_name,
            frontend_domid=fe_domid,
            frontend_domain=fe_name,
            devid=devid,
            backend_path=be_path,
            mode=mode,
            since_us=since_us,
            wrote_vbd=wrote_vbd,
        )

    def _register(self, record: ExportRecord, announce_later: bool = False) -> None:
        backing = record.backing
        fresh = not backing.users
        self.registry.add(record)
        if fresh and backing.fd != NO_FD and backing_name(backing) not in self.custody.held:
            self.custody.hold(backing_name(backing), backing.fd)
        self._publish_record(record, "exported", announce_later)

    def _publish_record(
        self, record: ExportRecord, event: str, announce_later: bool = False
    ) -> None:
        """A registered export: its blkback state, a log line, its D-Bus object, the watch.
        `announce_later` (a pre-attach): the D-Bus object and its signals come in a later turn
        of the event loop, behind the reply to the script's Attach if that is waiting for
        this export (its task was woken first). No message that follows that reply can be
        handled before them: an answer of policyd's names no object it has not exported."""
        remote = record.backing.kind == "vm"  # dom0's sysfs cannot see another domain's blkback
        record.state = STATE_BACKEND_IN_VM if remote else self.blkback.initial_state()
        ident = record.backing.identity
        logfmt.info(
            event,
            export=record.object_path,
            source=record.source,
            backend=record.backend_path,
            device=f"{ident.major}:{ident.minor}",
            diskseq=ident.diskseq,
            **dm_fields(record.backing),
            mode=record.mode,
            shared=len(record.backing.users) > 1,
        )
        if announce_later:
            asyncio.get_running_loop().call_later(0, self._announce, record)
        else:
            self._announce(record)
        if not remote:
            self.blkback.watch(record)

    def _announce(self, record: ExportRecord) -> None:
        """The export's D-Bus object and the count; nothing if it is gone already."""
        if self.registry.get(record.number) is record:
            self.listener.export_added(record)
            self.listener.export_count_changed(len(self.registry))

    def _unregister(self, record: ExportRecord, keep_fd: bool = False) -> bool:
        """The twin of _register: the export is gone from the registry and the bus. Its fd is
        released if it was the backing's last user (True), or stays held (in custody, so in the
        fd store) while XenStore may still name the device (keep_fd)."""
        self.blkback.forget(record)
        self._claim(record.backend_path)
        fd = self.registry.remove(record)
        if fd is not None and fd != NO_FD and not keep_fd:
            self.custody.release(backing_name(record.backing))
        self.listener.export_removed(record)
        self.listener.export_count_changed(len(self.registry))
        return fd is not None

    async def adopt(self, record: ExportRecord) -> None:
        """Start-up (policyd.exports.reconcile): an export found again in XenStore, with its
        backing (held already), back in the registry, on the bus and watched."""
        self.registry.add(record)
        self._publish_record(record, "adopted")
        if record.wrote_vbd:
            await self.frontends.watch(record.frontend_domid)

    def _state_changed(self, record: ExportRecord) -> None:
        if self.registry.get(record.number) is record:
            self.listener.export_changed(record, ["State"])


def still_attached(record: ExportRecord, nodes: BackendNodes) -> bool:
    """Whether the backend's nodes still describe this Attach export: the same params and mode,
    and physical-device naming its device (a re-created directory has none, or another)."""
    ident = record.backing.identity
    return (
        nodes.params == record.source
        and nodes.mode == record.mode
        and nodes.physical_device == f"{ident.major:x}:{ident.minor:x}"
    )


def backing_name(backing: Backing) -> str:
    """A held backing's name in the fd store."""
    return fd_name(backing.kind, backing.identity)


def dm_fields(backing: Backing) -> dict[str, str]:
    """A device-mapper device's name and uuid for a log line; none for another device."""
    names = backing.names
    return {"dm_name": names.dm_name, "dm_uuid": names.dm_uuid} if names.dm_name else {}


def _now_us() -> int:
    return time.time_ns() // 1000
