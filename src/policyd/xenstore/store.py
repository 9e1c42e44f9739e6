"""XenStore access for policyd: validated reads, vbd node sets written in one transaction.

Unprivileged policyd code, on policyd's event loop; XenStore content is validated here (through
policyd.validate) before anything else sees it. The connection, the deadline and the
transactions (retried on conflict) are policyd.xenstore.client's XsClient. Writes are always in a
transaction; some reads are not (`reads`), where no snapshot is needed: each such method says
why.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyxs.exceptions import PyXSError

from policyd import modes, validate
from policyd.errors import (
    Busy,
    DeviceChanged,
    InvalidArgument,
    NotFound,
    UnknownDomain,
    XenStoreError,
)
from policyd.xenstore.client import (
    BATCH_MAX,
    Tx,
    TxAhead,
    XsClient,
    exists_request,
    is_enoent,
    mkdir_requests,
    read_request,
    rm_request,
    write_request,
)

__all__ = ["BackendNodes", "PhysicalDevice", "Tx", "VbdSpec", "XenStore"]


class _StillOnline(NotFound):
    """remove_physical_device(if_offline=True) found the backend online: rolled back."""


MAX_DOMAINS = 4096
MAX_ERROR_CHARS = 512  # hotplug-error written at start-up
MAX_RECORDS = 65536  # VMs' device exports: far above what one dom0 runs
HOTPLUG_DEVIDS = tuple(validate.hotplug_devids())  # computed once: 701 of them


@dataclass(frozen=True)
class BackendNodes:
    """What libxl wrote for a vbd backend, validated."""

    params: str
    mode: str
    type: str
    frontend_id: int
    # what physical-device says now ("" if absent): Attach's idempotency check
    physical_device: str = ""


@dataclass(frozen=True)
class PhysicalDevice:
    major: int
    minor: int
    device_path: str
    diskseq: int


@dataclass(frozen=True)
class ExportTag:
    """What marks a backend as one blockbroker manages, written with its physical-device trio
    and found again at start-up (policyd.exports.reconcile): the export's number (its object
    path), its Source, and the high-water mark of export numbers under policyd's own
    /local/domain/<home>/blockbroker, so that a number is never given to another export after
    a restart. In a backend dir of policyd's home (dom0's: a guest can only read it) the tag
    sits in the dir. A VM's own device is exported from the VM's backend dir, which the VM
    owns and may rewrite: its tag, with the device, mode and nodes reconciliation needs, goes to
    a record under /local/domain/<home>/blockbroker/vm/ instead (vm_record_dir)."""

    number: int
    kind: str  # one of TAG_KINDS
    source: str
    home: int  # policyd's backend domain
    since_us: int = 0

    def nodes(self, be_dir: str) -> list[tuple[str, str]]:
        return [
            (f"{be_dir}/{EXPORT_NODE}", f"{self.number} {self.kind} {self.since_us}"),
            (f"{be_dir}/{SOURCE_NODE}", self.source),
            (counter_path(self.home, "export"), str(self.number)),
        ]


EXPORT_NODE = "blockbroker-export"  # in a managed backend dir: "<number> <kind> <since_us>"
TAG_KINDS = ("attach", "export", "vm")  # libxl's backend; Export's vbd; a VM's own device
TAG_RE = re.compile(r"(0|[1-9][0-9]{0,9}) (attach|export|vm) (0|[1-9][0-9]{0,19})")
BLOCK_SCRIPT = "blockbroker-block"  # libxl's `script` node for blockbroker's disks
UNTAGGED_ATTACH = "0 attach 0"  # number 0: reconciliation gives it a new one
SOURCE_NODE = "blockbroker-source"  # ... and its Source (a path, fd:MAJ:MIN, VM:/dev/NAME)
STATE_DIR = "blockbroker"  # /local/domain/<home>/blockbroker: policyd's counters


def vm_record_dir(home: int, backend_domid: int, frontend_domid: int, devid: int) -> str:
    """Where policyd keeps what it wrote for a VM's own device exported to another VM."""
    return f"/local/domain/{home}/{STATE_DIR}/vm/{backend_domid}-{frontend_domid}-{devid}"


VM_RECORD_RE = re.compile(r"(0|[1-9][0-9]{0,4})-(0|[1-9][0-9]{0,4})-([1-9][0-9]{0,9})")


def counter_path(home: int, kind: str) -> str:
    """/local/domain/<home>/blockbroker/last-<kind>: the highest number given out (export,
    request); nodes of dom0's that no guest can write."""
    return f"/local/domain/{home}/{STATE_DIR}/last-{kind}"


@dataclass(frozen=True)
class VbdSpec:
    """A hot-plugged vbd: what Export writes for the frontend and backend."""

    backend_domid: int
    frontend_domid: int
    params: str
    mode: str
    physical: PhysicalDevice
    tag: ExportTag | None = None

    def backend_dir(self, devid: int) -> str:
        return backend_dir(self.backend_domid, self.frontend_domid, devid)

    def frontend_dir(self, devid: int) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{devid}"


class XenStore(XsClient):
    """policyd's XenStore operations: what Export, Attach, Detach and requests read and write."""

    async def read_one(self, path: str) -> str | None:
        """One node's value (one read is atomic: no transaction needed)."""
        return await self.reads(lambda tx: tx.read(path))

    async def exists(self, path: str) -> bool:
        return await self.reads(lambda tx: tx.exists(path))

    # -- domains ---------------------------------------------------------------------------
    #
    # Names are looked up outside a transaction (two round trips: list, then every name at
    # once). A snapshot would not make the answer any truer: the name is used after the read
    # either way, in another transaction or none. Without one, a domain renamed or replaced
    # between the reads can only be missed or seen twice, and both fail closed (UnknownDomain,
    # "several domains"); every domid returned had that name when its name was read.

    async def find_domain(self, name: str) -> int:
        """Domain id of the running domain called `name` (from /local/domain/*/name)."""
        return (await self.find_domains([name]))[0]

    async def find_domains(self, names: list[str]) -> list[int]:
        """Each name's running domain, from one listing (UnknownDomain for the first missing)."""

        async def body(tx: Tx) -> list[int]:
            table = await read_domains(tx)
            return [domid_named(table, name) for name in names]

        return await self.reads(body)

    async def domain_name(self, domid: int) -> str:
        """The domain's validated name, or "" when it has none or a malformed one."""
        return valid_name(await self.read_one(f"/local/domain/{domid}/name"))

    async def find_export_domains(self, frontend: str, backend_domid: int) -> tuple[int, str]:
        """Export's reads: the frontend's domid and the backend's name (two round trips, no
        transaction: see above)."""

        async def body(tx: Tx) -> tuple[int, str]:
            table = await read_domains(tx, also=backend_domid)
            return domid_named(table, frontend), valid_name(table[backend_domid])

        return await self.reads(body)

    # -- libxl-made backends (Attach) --------------------------------------------------------

    async def read_backend(self, be: validate.BackendPath) -> tuple[BackendNodes, str, str]:
        """What libxl wrote for the backend, and the frontend's and backend's domain names, in
        one round trip outside a transaction. libxl writes these nodes in one transaction and
        the backend dir is dom0's (the frontend may only read it), so only dom0's toolstack
        rewriting the device could tear the read; write_physical_device re-reads params and
        mode in its own transaction and writes nothing if they changed (a check the
        transactional read never had: it ended before the write began). The names as above."""
        found = await self.read_backend_if(be, None)
        if found is None:  # only a script filter returns None
            raise NotFound(f"{be.path} does not exist")
        return found

    async def read_backend_if(
        self, be: validate.BackendPath, script: str | None
    ) -> tuple[BackendNodes, str, str] | None:
        """read_backend, in the same one round trip; with `script`, None (nothing validated,
        nothing raised) unless the backend exists, its `script` node names a file of that
        name (libxl writes the hotplug script's absolute path there) and it is online (libxl
        sets online = 0 when it begins removing the device)."""

        async def body(tx: Tx) -> tuple[BackendNodes, str, str] | None:
            names = ("params", "mode", "type", "frontend-id")
            name_paths = [f"/local/domain/{d}/name" for d in (be.frontend_domid, be.backend_domid)]
            found = await tx.read_many(
                [f"{be.path}/{name}" for name in names]
                + name_paths
                + [f"{be.path}/physical-device", f"{be.path}/online", f"{be.path}/script"]
            )
            untrusted_script, online = found.pop(), found.pop()
            if script is not None and (
                untrusted_script is None
                or untrusted_script.rpartition("/")[2] != script
                or online != "1"
            ):
                return None
            values = {}
            for name, value in zip(names, found, strict=False):
                if value is None:
                    raise NotFound(
                        f"{be.path}/{name} does not exist; Attach is for a backend that "
                        "libxl has written (params, mode, type, frontend-id)"
                    )
                values[name] = value
            params = validate.source_path(values["params"], XenStoreError)
            frontend_id = validate.domid(values["frontend-id"])
            if frontend_id != be.frontend_domid:
                raise XenStoreError(
                    f"{be.path}/frontend-id is {frontend_id}, the path says {be.frontend_domid}"
                )
            nodes = BackendNodes(
                params,
                validate.mode(values["mode"]),
                validate.backend_type(values["type"]),
                frontend_id,
                found[-1] or "",  # only ever compared with what policyd itself would write
            )
            return nodes, valid_name(found[len(names)]), valid_name(found[len(names) + 1])

        return await self.reads(body)

    async def write_physical_device(
        self,
        be_path: str,
        phys: PhysicalDevice,
        nodes: BackendNodes,
        tag: ExportTag,
        ahead: TxAhead | None = None,
    ) -> float:
        """The trio and hotplug-status = connected (what a hotplug script's success() writes),
        in one transaction, sent as one batch behind the check that the backend still exists
        and still has the params and mode Attach read (`nodes`); if not, the transaction is
        rolled back: nothing is written. Returns when its commit was sent (time.monotonic()):
        the check held at a moment after that. `ahead`: the first attempt's transaction,
        started already (XsClient.transaction_ahead)."""

        async def body(tx: Tx) -> Tx:
            written = [*physical_nodes(phys), ("hotplug-status", "connected")]
            exists, params, mode, *replies = await tx.batch(
                [
                    exists_request(be_path),
                    read_request(f"{be_path}/params"),
                    read_request(f"{be_path}/mode"),
                    *(write_request(f"{be_path}/{n}", v) for n, v in written),
                    *(write_request(path, v) for path, v in tag.nodes(be_path)),
                ]
            )
            if is_enoent(exists):
                raise NotFound(f"{be_path} disappeared while attaching; nothing was written")
            for reply in [exists, *(r for r in (params, mode) if not is_enoent(r)), *replies]:
                if isinstance(reply, PyXSError):
                    raise reply  # Error.XenStore; a missing params or mode is a change
            if params != nodes.params.encode() or mode != nodes.mode.encode():
                raise DeviceChanged(
                    f"{be_path}: params or mode changed while attaching; nothing was written"
                )
            return tx

        return (await self.transact(body, ahead)).commit_sent

    async def remove_physical_device(
        self, be_path: str, status: bool = False, *, if_offline: bool = False
    ) -> bool:
        """Remove the trio and the export's tag, and with `status` hotplug-status (a node
        already gone, or the whole backend, is no error). With `if_offline`, only if the
        backend's `online` node is 0 (libxl is removing the device): read in the same
        transaction and batch as the removals, which is rolled back if it is not (False:
        nothing was removed); an error before that is an Error.XenStore with nothing removed,
        and only once it was 0 can the outcome be unknown (CommitUnknown)."""
        names = [n for n, _ in physical_nodes(None)] + [EXPORT_NODE, SOURCE_NODE]
        names += ["hotplug-status"] if status else []
        paths = [f"{be_path}/{n}" for n in names]
        if not if_offline:
            await self.transact(lambda tx: tx.rm_many(paths))
            return True

        async def body(tx: Tx) -> None:
            online, *removed = await tx.batch(
                [read_request(f"{be_path}/online"), *(rm_request(p) for p in paths)]
            )
            if isinstance(online, PyXSError) and not is_enoent(online):
                raise online  # Error.XenStore, rolled back: nothing removed
            if online != b"0":
                raise _StillOnline(be_path)  # missing or not 0: rolled back
            for reply in removed:
                if isinstance(reply, PyXSError) and not is_enoent(reply):
                    raise reply  # Error.XenStore, rolled back

        try:
            await self.transact(body)
        except _StillOnline:
            return False
        return True

    async def write_tag(self, be_path: str, tag: ExportTag) -> None:
        """Tag a backend found untagged (left by a version before tags), if it still exists."""

        async def body(tx: Tx) -> None:
            if await tx.exists(be_path):
                await tx.write_many(tag.nodes(be_path))

        await self.transact(body)

    async def fail_backend(self, be_path: str, reason: str) -> None:
        """Reconciliation found that the device a backend names is gone or another one: the
        trio and the tag go, and hotplug-error says why (blkback never opens a device that was
        not written; libxl and `xl` show the error)."""
        names = [n for n, _ in physical_nodes(None)] + [EXPORT_NODE, SOURCE_NODE]

        async def body(tx: Tx) -> None:
            if await tx.exists(be_path):
                await tx.rm_many([f"{be_path}/{n}" for n in names])
                await tx.write_many([(f"{be_path}/hotplug-error", reason[:MAX_ERROR_CHARS])])

        await self.transact(body)

    async def managed_backends(self, home: int) -> list[ManagedBackend]:
        """Every vbd backend blockbroker manages, with what reconciliation needs: the tagged
        backend dirs of policyd's home, and the records of VMs' own devices (their backend
        dirs are the VMs'; only whether they still exist is read there). Read outside a
        transaction: policyd is the only writer of tags and records, and it is starting."""

        async def body(tx: Tx) -> list[ManagedBackend]:
            base = f"/local/domain/{home}/backend/vbd"
            dirs = []
            for frontend in (await tx.children(base))[:MAX_DOMAINS]:
                for devid in (await tx.children(f"{base}/{frontend}"))[:MAX_DOMAINS]:
                    with contextlib.suppress(InvalidArgument):  # not a vbd: not policyd's
                        dirs.append(validate.backend_path(f"{base}/{frontend}/{devid}", home))
            tags = await tx.read_many([f"{d.path}/{EXPORT_NODE}" for d in dirs])
            tagged = [(d, d.path, tag) for d, tag in zip(dirs, tags, strict=True) if tag]
            # A version without tags (before the fd store) left libxl backends with the trio
            # that blockbroker-block's Attach wrote: taken as untagged Attach exports.
            untagged = [d for d, tag in zip(dirs, tags, strict=True) if tag is None]
            scripts = await tx.read_many([f"{d.path}/script" for d in untagged])
            seqs = await tx.read_many([f"{d.path}/diskseq" for d in untagged])
            tagged += [
                (d, d.path, UNTAGGED_ATTACH)
                for d, script, seq in zip(untagged, scripts, seqs, strict=True)
                if seq is not None and (script or "").rsplit("/", 1)[-1] == BLOCK_SCRIPT
            ]
            records = f"/local/domain/{home}/{STATE_DIR}/vm"
            vm = []
            for entry in (await tx.children(records))[:MAX_RECORDS]:
                m = VM_RECORD_RE.fullmatch(entry)
                if m is None:
                    continue  # only policyd writes here: nothing else to find
                be = validate.backend_path(backend_dir(int(m[1]), int(m[2]), int(m[3])), home)
                vm.append((be, f"{records}/{entry}"))
            vm_tags = await tx.read_many([f"{rec}/{EXPORT_NODE}" for _, rec in vm])
            tagged += [(be, rec, tag) for (be, rec), tag in zip(vm, vm_tags, strict=True) if tag]
            alive = await tx.exists_many([be.path for be, _, _ in tagged])
            names = (SOURCE_NODE, "params", "mode", *(n for n, _ in physical_nodes(None)))
            values = await tx.read_many([f"{d}/{n}" for _, d, _ in tagged for n in names])
            found = []
            for i, (be, _, tag) in enumerate(tagged):
                nodes = dict(zip(names, values[i * len(names) : (i + 1) * len(names)], strict=True))
                found.append(parse_managed(be, tag, home, nodes, alive[i]))
            return found

        return await self.reads(body)

    async def domain_names(self) -> dict[int, str]:
        """Every domain's validated name ("" if it has none or a malformed one)."""

        async def body(tx: Tx) -> dict[int, str]:
            return {d: valid_name(n) for d, n in (await read_domains(tx)).items()}

        return await self.reads(body)

    async def read_counter(self, home: int, kind: str) -> int:
        value = await self.read_one(counter_path(home, kind))
        return int(value) if value is not None and value.isdigit() and len(value) <= 10 else 0

    async def write_counter(self, home: int, kind: str, number: int) -> None:
        await self.transact(lambda tx: tx.write_many([(counter_path(home, kind), str(number))]))

    # -- hot-plug vbds (Export) ---------------------------------------------------------------

    async def add_vbd(self, spec: VbdSpec, devid: int | None) -> int:
        """Write FE and BE nodes (with the physical-device trio) in one transaction.

        devid None: the first free xvd device number from xvdb. Returns the devid used.
        """

        async def body(tx: Tx) -> int:
            # the first candidate's check also asks for the parents (one round trip)
            first = devid if devid is not None else HOTPLUG_DEVIDS[0]
            be_dir, fe_dir, *parents = await tx.exists_many(
                [spec.backend_dir(first), spec.frontend_dir(first), *vbd_parents(spec)]
            )
            if devid is not None:
                if be_dir or fe_dir:
                    raise Busy(f"devid {devid} is in use in domain {spec.frontend_domid}")
                chosen = devid
            elif not (be_dir or fe_dir):
                chosen = first
            else:
                chosen = await first_free_devid(tx, spec, HOTPLUG_DEVIDS[1:])
                if not chosen:
                    raise Busy(f"no free xvd device number in domain {spec.frontend_domid}")
            await write_vbd(tx, spec, chosen, (parents[0], parents[1]))
            return chosen

        return await self.transact(body)

    async def remove_vbd(self, spec: VbdSpec, devid: int, home: int) -> None:
        """Remove a vbd policyd wrote: both dirs, and its record if its backend is a VM's."""
        dirs = [spec.backend_dir(devid), spec.frontend_dir(devid)]
        if spec.backend_domid != home:
            dirs.append(vm_record_dir(home, spec.backend_domid, spec.frontend_domid, devid))
        be_parent, _ = vbd_parents(spec)

        async def body(tx: Tx) -> None:
            await tx.rm_many(dirs)
            # the frontend's dir under the backend's vbd/, once its last device is gone (libxl
            # removes the ones it made; this one policyd made)
            if not await tx.children(be_parent):
                await tx.rm_many([be_parent])

        await self.transact(body)

    async def set_backend_closing(self, be_path: str) -> None:
        """Ask blkback to disconnect (online=0, state=Closing) before the nodes go away."""

        async def body(tx: Tx) -> None:
            if await tx.exists(be_path):
                await tx.write_many(
                    [(f"{be_path}/online", "0"), (f"{be_path}/state", str(XENBUS_STATE_CLOSING))]
                )

        await self.transact(body)


@dataclass(frozen=True)
class ManagedBackend:
    """A backend carrying blockbroker's tag, as reconciliation found it. `problem` is set when
    its nodes are not what policyd writes (then it is failed, never adopted)."""

    path: str
    backend_domid: int
    frontend_domid: int
    devid: int
    number: int
    kind: str
    since_us: int
    source: str
    params: str
    mode: str
    major: int
    minor: int
    device_path: str
    diskseq: int
    problem: str = ""


PHYSICAL_DEVICE_RE = re.compile(r"([0-9a-f]{1,8}):([0-9a-f]{1,8})")
DISKSEQ_RE = re.compile(r"[0-9a-f]{1,16}")


def parse_managed(
    be: validate.BackendPath, tag: str, home: int, nodes: dict[str, str | None], alive: bool
) -> ManagedBackend:
    """Parse a managed backend's nodes, read from its dir (policyd's home) or from its record
    (a VM's device), strictly: anything malformed becomes `problem`. Kind `vm` is taken only
    from a record, the others only from a dir in policyd's home."""
    m = TAG_RE.fullmatch(tag)
    phys = PHYSICAL_DEVICE_RE.fullmatch(nodes["physical-device"] or "")
    seq = nodes["diskseq"] or ""
    problem = ""
    if m is None or (m[1] == "0" and tag != UNTAGGED_ATTACH):
        problem = f"malformed {EXPORT_NODE} {tag[:40]!r}"
    elif (m[2] == "vm") == (be.backend_domid == home):
        problem = f"a {m[2]} export cannot have its backend in domain {be.backend_domid}"
    elif not alive:
        problem = "its backend directory is gone"
    elif phys is None or not DISKSEQ_RE.fullmatch(seq):
        problem = "no well-formed physical-device and diskseq"
    elif nodes["mode"] not in modes.MODES:
        problem = "no valid mode"
    return ManagedBackend(
        path=be.path,
        backend_domid=be.backend_domid,
        frontend_domid=be.frontend_domid,
        devid=be.devid,
        number=int(m[1]) if m else 0,
        kind=m[2] if m else "",
        since_us=int(m[3]) if m else 0,
        source=nodes[SOURCE_NODE] or nodes["params"] or "",
        params=nodes["params"] or "",
        mode=nodes["mode"] or "",
        major=int(phys[1], 16) if phys else 0,
        minor=int(phys[2], 16) if phys else 0,
        device_path=nodes["physical-device-path"] or "",
        diskseq=int(seq, 16) if not problem else 0,
        problem=problem,
    )


def valid_name(untrusted: str | None) -> str:
    """A domain's validated name, or "" when it has none or a malformed one."""
    try:
        return validate.domain_name(untrusted, XenStoreError)
    except XenStoreError:
        return ""


async def read_domains(tx: Tx, also: int | None = None) -> dict[int, str | None]:
    """Every domain listed under /local/domain (junk entries skipped) with its untrusted name
    (None: it has none), and domain `also` even if unlisted: two round trips."""
    domids = []
    for entry in (await tx.children("/local/domain"))[:MAX_DOMAINS]:
        try:
            domids.append(validate.domid(entry))
        except XenStoreError:
            continue  # junk under /local/domain is not a domain
    listed = dict.fromkeys(domids)
    if also is not None:
        listed.setdefault(also)
    untrusted = await tx.read_many([f"/local/domain/{d}/name" for d in listed])
    return dict(zip(listed, untrusted, strict=True))


def domid_named(untrusted_table: dict[int, str | None], name: str) -> int:
    """The one domain called `name` in a read_domains table."""
    found = [d for d, n in untrusted_table.items() if n == name]
    if not found:
        raise UnknownDomain(f"no running domain is named {name!r}; check `xl list`")
    if len(found) > 1:
        raise XenStoreError(f"several domains are named {name!r} ({found}); refusing")
    return found[0]


XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_CONNECTED = 4
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6


def backend_dir(backend_domid: int, frontend_domid: int, devid: int) -> str:
    """The vbd backend directory, as libxl names it."""
    return f"/local/domain/{backend_domid}/backend/vbd/{frontend_domid}/{devid}"


def physical_nodes(phys: PhysicalDevice | None) -> list[tuple[str, str]]:
    if phys is None:
        return [("physical-device", ""), ("physical-device-path", ""), ("diskseq", "")]
    return [
        ("physical-device", f"{phys.major:x}:{phys.minor:x}"),
        ("physical-device-path", phys.device_path),
        ("diskseq", f"{phys.diskseq:x}"),
    ]


async def first_free_devid(tx: Tx, spec: VbdSpec, candidates: Sequence[int]) -> int:
    """The first candidate with neither a backend nor a frontend dir (0: none), checked
    BATCH_MAX // 2 candidates per round trip."""
    step = BATCH_MAX // 2
    for start in range(0, len(candidates), step):
        chunk = candidates[start : start + step]
        dirs = [p for d in chunk for p in (spec.backend_dir(d), spec.frontend_dir(d))]
        found = await tx.exists_many(dirs)
        for i, devid in enumerate(chunk):
            if not (found[2 * i] or found[2 * i + 1]):
                return devid
    return 0


def vbd_parents(spec: VbdSpec) -> tuple[str, str]:
    be, fe = spec.backend_domid, spec.frontend_domid
    return f"/local/domain/{be}/backend/vbd/{fe}", f"/local/domain/{fe}/device/vbd"


async def write_vbd(
    tx: Tx, spec: VbdSpec, devid: int, parents_exist: tuple[bool, bool] | None = None
) -> None:
    """The node set libxl's device_disk_add writes, plus the physical-device trio.

    Permissions as libxl sets them: the backend side is owned by the backend domain and readable
    by the frontend; the frontend side is owned by the frontend and readable by the backend.
    Parents are created with those permissions first (nodes inherit their parent's).
    """
    be, fe = spec.backend_domid, spec.frontend_domid
    be_parent, fe_parent = vbd_parents(spec)
    be_dir, fe_dir = spec.backend_dir(devid), spec.frontend_dir(devid)
    be_perms, fe_perms = [f"n{be}", f"r{fe}"], [f"n{fe}", f"r{be}"]
    if parents_exist is None:
        be_found, fe_found = await tx.exists_many([be_parent, fe_parent])
        parents_exist = (be_found, fe_found)
    have_be_parent, have_fe_parent = parents_exist
    dirs = [] if have_be_parent else [(be_parent, be_perms)]
    dirs += [] if have_fe_parent else [(fe_parent, fe_perms)]
    dirs += [(be_dir, be_perms), (fe_dir, fe_perms)]
    be_nodes = [
        ("frontend", fe_dir),
        ("frontend-id", str(fe)),
        ("params", spec.params),
        ("online", "1"),
        ("removable", "0"),
        ("bootable", "1"),
        ("state", str(XENBUS_STATE_INITIALISING)),
        ("dev", validate.vdev_name(devid)),
        ("type", "phy"),
        ("mode", spec.mode),
        ("device-type", "disk"),
        ("discard-enable", "0"),
        *physical_nodes(spec.physical),
    ]
    tag_nodes = [] if spec.tag is None else spec.tag.nodes(be_dir)
    if spec.tag is not None and spec.tag.kind == "vm":  # the VM's dir: the record is dom0's
        record = vm_record_dir(spec.tag.home, be, fe, devid)
        tag_nodes = [
            *spec.tag.nodes(record),
            (f"{record}/params", spec.params),
            (f"{record}/mode", spec.mode),
            *((f"{record}/{n}", v) for n, v in physical_nodes(spec.physical)),
        ]
    fe_nodes = [
        ("backend", be_dir),
        ("backend-id", str(be)),
        ("state", str(XENBUS_STATE_INITIALISING)),
        ("virtual-device", str(devid)),
        ("device-type", "disk"),
    ]
    await tx.run(
        [
            *(r for path, perms in dirs for r in mkdir_requests(path, perms)),
            *(write_request(f"{be_dir}/{n}", v) for n, v in be_nodes),
            *(write_request(path, v) for path, v in tag_nodes),
            *(write_request(f"{fe_dir}/{n}", v) for n, v in fe_nodes),
        ]
    )
