"""Export, attach and detach: broker fds, XenStore nodes and the registry, kept consistent.

Unprivileged policyd code; arguments arrive already validated by policyd.service, and XenStore
content is validated by policyd.xenstore. The broker decides what may be opened at all; this
module decides sharing (opening itself is policyd.sources), writes the nodes and holds the fds.
Every operation runs under one asyncio lock, so registry checks and the XenStore/broker steps
that follow cannot interleave.
XenStore and the broker are reached on the event loop (policyd.xenstore, policyd.brokerclient),
each bounded by a deadline. A failed operation undoes what it did (ExitStack, handed over with
pop_all() only on success): no fd, node or loop device is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from broker.protocol import ErrorCode
from policyd import brokerclient, errors, logfmt, validate
from policyd.blkback import BlkbackWatcher
from policyd.brokerclient import AsyncBrokerClient, BrokerError, Identity
from policyd.registry import (
    STATE_CONNECTED,
    STATE_REMOTE,
    Backing,
    BackingKey,
    ExportRecord,
    Registry,
)
from policyd.sources import Sources, device_path, physical
from policyd.xenstore import (
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CONNECTED,
    BackendNodes,
    VbdSpec,
    XenStore,
    backend_dir,
)

T = TypeVar("T")
CLOSE_WAIT_S = 5.0  # how long Detach waits for a connected blkback to close the device
CLOSE_POLL_S = 0.05
FRONTEND_TOKEN = "frontend-"  # watch tokens: frontend-<domid>
NO_FD = -1  # a device in another domain (a VM's own, through a request): policyd holds no fd
Domain = tuple[int, str]  # domid, and its name as read from XenStore ("" if it has none)
# (operation, dom0 path, backend, frontend, writable) -> None, or PolicyDenied
PolicyCheck = Callable[[str, str, Domain, Domain, bool], Awaitable[None]]


async def deny_without_policy(
    operation: str, path: str, backend: Domain, frontend: Domain, writable: bool
) -> None:
    raise errors.PolicyDenied(f"{operation} of {path}: no export policy is configured: deny")


LOOP_BUSY_ATTEMPTS = 3
BROKER_TIMEOUT_S = 5.0  # a broker request takes milliseconds; far beyond that it is stuck

BROKER_ERRORS: dict[ErrorCode, type[errors.PolicydError]] = {
    ErrorCode.BAD_PATH: errors.InvalidArgument,
    ErrorCode.BAD_ARGUMENT: errors.InvalidArgument,
    ErrorCode.NOT_FOUND: errors.NotFound,
    ErrorCode.NOT_BLOCK_DEVICE: errors.InvalidArgument,
    ErrorCode.NOT_REGULAR_FILE: errors.InvalidArgument,
    ErrorCode.IDENTITY_MISMATCH: errors.DeviceChanged,
    ErrorCode.VERIFY_FAILED: errors.DeviceChanged,
    ErrorCode.LOOP_BUSY: errors.Busy,
    ErrorCode.IN_USE: errors.Refused,
    ErrorCode.UNAVAILABLE: errors.BrokerUnavailable,
    ErrorCode.PROTOCOL: errors.BrokerUnavailable,
    ErrorCode.INTERNAL: errors.Internal,
}


class Listener(Protocol):
    """What the D-Bus layer does when the registry changes."""

    def export_added(self, record: ExportRecord) -> None: ...
    def export_removed(self, record: ExportRecord) -> None: ...
    def export_changed(self, record: ExportRecord, names: list[str]) -> None: ...
    def manager_changed(self, names: list[str]) -> None: ...


def broker_error(e: BrokerError, what: str) -> errors.PolicydError:
    cls = BROKER_ERRORS.get(e.code, errors.Refused)
    if cls is errors.BrokerUnavailable:
        return cls(f"the broker is unavailable ({e}); check blockbroker-broker.service")
    if cls is errors.Internal:  # the detail goes to the log, never onto the wire
        logfmt.error("broker internal error", what=what, detail=str(e))
        return cls("internal error in the broker; see the broker's and policyd's logs")
    return cls(f"broker refused {what}: {e}")


class Exporter:
    def __init__(
        self,
        broker: AsyncBrokerClient,
        xenstore: XenStore,
        *,
        backend_domid: int,
        sysfs_root: str,
        listener: Listener,
    ) -> None:
        self.broker = broker
        self.xenstore = xenstore
        self.backend_domid = backend_domid
        self.kept_after_unknown_commit: list[contextlib.ExitStack] = []
        self.registry = Registry()
        self.listener = listener
        self.broker_connected = False
        self.blkback = BlkbackWatcher(sysfs_root, self._state_changed)
        self.sources = Sources(self.registry, broker, self._broker)
        self.policy_check: PolicyCheck = deny_without_policy  # policyd.audit.PolicyGate's
        self._lock = asyncio.Lock()
        self._frontends_to_check: set[int] = set()
        self._sweep_task: asyncio.Task[None] | None = None
        xenstore.on_watch = self._frontend_event
        xenstore.connection_changed = self._xenstore_connection_changed

    def shutdown(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        for kept in self.kept_after_unknown_commit:
            kept.close()
        self.blkback.stop()
        self.xenstore.close()
        self.broker.close()

    async def _publish(self, undo: contextlib.ExitStack, step: Awaitable[T]) -> T:
        """Run the step that names a device in XenStore (its commit). Once it succeeded, the
        fds in `undo` are held whatever happens next (a failure after it leaks, never frees).
        If the commit's outcome is unknown, or the step is cancelled while it may be in
        flight, XenStore may name the device now: closing its fd would let AUTOCLEAR free the
        number for reuse under that name (the race blockbroker exists to close). So the fds
        are kept, until policyd stops, and the error is still reported."""
        try:
            result = await step
        except (errors.CommitUnknown, asyncio.CancelledError):
            self.kept_after_unknown_commit.append(undo.pop_all())
            logfmt.warning("commit outcome unknown: keeping the device's fd until policyd stops")
            raise
        undo.pop_all()
        return result

    # -- XenStore's connection state, broker requests -------------------------------------------

    def _xenstore_connection_changed(self) -> None:
        """policyd.xenstore connected or lost its connection (the latter: EOF, a protocol
        error or a missed deadline; the next XenStore operation reconnects)."""
        self.listener.manager_changed(["XenStoreConnected"])

    async def _broker(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a broker request, bounded by BROKER_TIMEOUT_S. LOOP_BUSY (the broker's own
        bounded retry lost every race for a free loop device to other allocators) is retried a
        few times here, after a growing random pause, before it becomes Error.Busy."""
        for attempt in range(LOOP_BUSY_ATTEMPTS):
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):  # no extra task, unlike wait_for
                    result = await call()
            except TimeoutError:
                # The cancelled request dropped its connection (AsyncBrokerClient): a late
                # reply and its fd die with it. The next call reconnects, and times out the
                # same way until the broker answers again.
                self._set_broker_connected(False)
                logfmt.warning("the broker does not answer; request abandoned", what=what)
                raise errors.BrokerUnavailable(
                    f"the broker did not answer within {BROKER_TIMEOUT_S:g} s; check "
                    "blockbroker-broker.service"
                ) from None
            except BrokerError as e:
                self._set_broker_connected(not isinstance(e, brokerclient.BrokerUnavailable))
                if e.code == ErrorCode.LOOP_BUSY and attempt + 1 < LOOP_BUSY_ATTEMPTS:
                    logfmt.warning("no free loop device; retrying", what=what, attempt=attempt)
                    await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                    continue
                raise broker_error(e, what) from None
            self._set_broker_connected(True)
            return result
        raise AssertionError("unreachable")

    def _set_broker_connected(self, connected: bool) -> None:
        if connected != self.broker_connected:
            self.broker_connected = connected
            self.listener.manager_changed(["BrokerConnected"])

    async def probe(self) -> None:
        """Start-up: connect to XenStore (read the backend domain's name); errors are logged."""
        with contextlib.suppress(errors.PolicydError):
            await self.xenstore.domain_name(self.backend_domid)

    # -- operations ---------------------------------------------------------------------------

    async def export_path(
        self, path: str, frontend: str, opts: validate.ExportOptions
    ) -> ExportRecord:
        async with self._lock:
            fe_domid, be_name = await self.xenstore.find_export_domains(
                frontend, self.backend_domid
            )
            backend = (self.backend_domid, be_name)
            await self.policy_check(
                "export", path, backend, (fe_domid, frontend), not opts.read_only
            )
            with contextlib.ExitStack() as undo:
                backing = await self.sources.open_path(
                    path, not opts.read_only, opts.direct_io, undo
                )
                return await self._export(path, backing, fe_domid, frontend, be_name, opts, undo)

    async def export_fd(self, fd: int, frontend: str, opts: validate.ExportOptions) -> ExportRecord:
        async with self._lock:
            with contextlib.ExitStack() as undo:
                undo.callback(os.close, fd)  # ours from here on; closed unless held
                fe_domid, be_name = await self.xenstore.find_export_domains(
                    frontend, self.backend_domid
                )
                backing = await self.sources.adopt_fd(fd, not opts.read_only)
                if backing.fd != fd:
                    undo.close()  # a shared backing holds its own fd: the caller's is not needed
                await self.policy_check(
                    "export",
                    device_path(backing),
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
        mode = "r" if opts.read_only else "w"
        spec = VbdSpec(self.backend_domid, fe_domid, source, mode, physical(backing))
        devid = await self._publish(undo, self.xenstore.add_vbd(spec, opts.devid))
        record = self._record(
            source,
            backing,
            fe_domid,
            frontend,
            devid,
            spec.backend_dir(devid),
            mode,
            be_name,
            wrote_vbd=True,
        )
        self._register(record)
        await self._watch_frontend(fe_domid)
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
        async with self._lock:
            nodes, fe_name, be_name = await self.xenstore.read_backend(be)
            existing = self.registry.by_backend_path(be.path)
            if existing is not None:
                if still_attached(existing, nodes):
                    return existing  # called twice: the same export
                self._drop_stale(existing, nodes)
            with contextlib.ExitStack() as undo:
                await self.policy_check(
                    "attach",
                    nodes.params,
                    (be.backend_domid, be_name),
                    (be.frontend_domid, fe_name),
                    nodes.mode == "w",
                )
                backing = await self.sources.open_path(nodes.params, nodes.mode == "w", False, undo)
                # once the trio is written, the fd is held
                await self._publish(
                    undo, self.xenstore.write_physical_device(be.path, physical(backing), nodes)
                )
                record = self._record(
                    nodes.params,
                    backing,
                    be.frontend_domid,
                    fe_name,
                    be.devid,
                    be.path,
                    nodes.mode,
                    be_name,
                    wrote_vbd=False,
                )
                self._register(record)
            return record

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

    # -- exports whose frontend domain died ------------------------------------------------------
    #
    # libxl removes /local/domain/<domid> when it destroys a domain, but it does not know the
    # vbds Export wrote, so their nodes and held devices would stay. policyd watches each
    # frontend's name node (dom0's: the guest cannot write it) while it has exports there;
    # when the node is gone, those exports are detached and the watch is dropped.

    async def _watch_frontend(self, fe_domid: int) -> None:
        token = f"{FRONTEND_TOKEN}{fe_domid}"
        if token in self.xenstore.watches:
            return
        try:
            await self.xenstore.watch(f"/local/domain/{fe_domid}/name", token)
        except errors.XenStoreError as e:
            logfmt.warning(
                "cannot watch the frontend domain; its exports stay if it dies",
                frontend=fe_domid,
                error=e,
            )

    def _frontend_event(self, path: str, token: str) -> None:
        """A watch fired (on the event loop): note the domain, check it in one task."""
        domid = token.removeprefix(FRONTEND_TOKEN)
        if domid == token or not domid.isdigit():
            return
        self._frontends_to_check.add(int(domid))
        if self._sweep_task is None or self._sweep_task.done():
            self._sweep_task = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._frontends_to_check:
            fe_domid = self._frontends_to_check.pop()
            try:
                if await self.xenstore.read_one(f"/local/domain/{fe_domid}/name") is not None:
                    continue  # alive (a watch also fires once when it is set)
            except errors.XenStoreError:
                continue  # a new connection sets the watches again, and they fire again
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
            with contextlib.suppress(errors.XenStoreError):
                await self.xenstore.unwatch(f"{FRONTEND_TOKEN}{fe_domid}")

    async def detach_backend(self, untrusted_path: str) -> None:
        be = self._own_backend_path(untrusted_path)
        record = self.registry.by_backend_path(be.path)
        if record is None:
            raise errors.NotFound(f"no export for {be.path}")
        await self.detach(record)

    async def detach(self, record: ExportRecord) -> None:
        async with self._lock:
            if self.registry.get(record.number) is not record:
                raise errors.NotFound(f"{record.object_path} is already detached")
            spec = VbdSpec(
                record.backend_domid,
                record.frontend_domid,
                "",
                record.mode,
                physical(record.backing),
            )
            if record.wrote_vbd:
                if record.state == STATE_CONNECTED or (
                    record.state == STATE_REMOTE and await self._remote_connected(record)
                ):
                    await self._wait_closed(record)
                await self.xenstore.remove_vbd(spec, record.devid)
            keep = False
            if not record.wrote_vbd:  # Attach's: libxl owns the dir, policyd only the trio
                try:
                    await self.xenstore.remove_physical_device(record.backend_path)
                except errors.XenStoreError as e:
                    # libxl removes the backend dir itself (libxl's remove must not fail over
                    # it), but until then the trio may still name the device: its fd is kept
                    logfmt.warning(
                        "could not remove physical-device nodes; keeping the device's fd "
                        "until policyd stops",
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

    async def xenstore_call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await a XenStore method (policyd.service's policy gate reads names through this)."""
        return await fn(*args)

    async def export_foreign(
        self,
        source: str,
        identity: Identity,
        backend: tuple[int, str],
        frontend: tuple[int, str],
        mode: str,
        write_nodes: Callable[[XenStore], Awaitable[int]],
    ) -> ExportRecord:
        """Register an export of a device in another domain (a VM's own device, approved
        through policyd.requests): policyd holds no fd, the backend domain's blkback opens it;
        it is listed and detached like any export. `write_nodes` writes the vbd in one
        transaction and returns the devid; nothing is registered if it raises. The backing key
        names the domain, so it never matches dom0's own devices."""
        (be_domid, be_name), (fe_domid, fe_name) = backend, frontend
        key: BackingKey = (f"dom{be_domid}", identity.major, identity.minor)
        async with self._lock:
            shared = self.registry.shareable(key, mode == "w")
            devid = await write_nodes(self.xenstore)
            backing = shared or self.registry.new_backing(key, NO_FD, identity, "vm", mode == "w")
            be_path = backend_dir(be_domid, fe_domid, devid)
            record = self._record(
                source,
                backing,
                fe_domid,
                fe_name,
                devid,
                be_path,
                mode,
                be_name,
                wrote_vbd=True,
                be_domid=be_domid,
            )
            self._register(record)
            await self._watch_frontend(fe_domid)
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
            if record.state != STATE_REMOTE and not self.blkback.holds(record):
                return
            await asyncio.sleep(CLOSE_POLL_S)
        logfmt.warning("backend did not reach Closed; removing its nodes anyway", path=be_path)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _record(
        self,
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
        be_domid: int | None = None,  # another domain's backend (a VM's own device)
    ) -> ExportRecord:
        return ExportRecord(
            number=self.registry.next_number(),
            source=source,
            backing=backing,
            backend_domid=self.backend_domid if be_domid is None else be_domid,
            backend_domain=be_name,
            frontend_domid=fe_domid,
            frontend_domain=fe_name,
            devid=devid,
            backend_path=be_path,
            mode=mode,
            since_us=time.time_ns() // 1000,
            wrote_vbd=wrote_vbd,
        )

    def _register(self, record: ExportRecord) -> None:
        self.registry.add(record)
        remote = record.backing.kind == "vm"  # dom0's sysfs cannot see another domain's blkback
        record.state = STATE_REMOTE if remote else self.blkback.initial_state()
        ident = record.backing.identity
        logfmt.info(
            "exported",
            export=record.object_path,
            source=record.source,
            backend=record.backend_path,
            device=f"{ident.major}:{ident.minor}",
            diskseq=ident.diskseq,
            mode=record.mode,
            shared=len(record.backing.users) > 1,
        )
        self.listener.export_added(record)
        self.listener.manager_changed(["ExportCount"])
        if not remote:
            self.blkback.watch(record)

    def _unregister(self, record: ExportRecord, keep_fd: bool = False) -> bool:
        """The twin of _register: the export is gone from the registry and the bus. Its fd is
        closed if it was the backing's last user (True), or kept until policyd stops while
        XenStore may still name the device (keep_fd)."""
        self.blkback.forget(record)
        fd = self.registry.remove(record)
        if fd is not None and fd != NO_FD:
            if keep_fd:
                kept = contextlib.ExitStack()
                kept.callback(os.close, fd)
                self.kept_after_unknown_commit.append(kept)
            else:
                os.close(fd)
        self.listener.export_removed(record)
        self.listener.manager_changed(["ExportCount"])
        return fd is not None

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
