"""XenStore access for policyd: validated reads, vbd node sets written in one transaction.

Unprivileged policyd code; XenStore content is validated here (through policyd.validate) before
anything else sees it. Every method blocks (pyxs is synchronous) and must run on the single
XenStore worker thread (see policyd.exporter), so one pyxs client is never used concurrently.
Transactions are retried on conflict (EAGAIN at commit), at most MAX_TX_ATTEMPTS times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyxs import Client
from pyxs._internal import Op, Packet
from pyxs.exceptions import PyXSError

from policyd import validate
from policyd.errors import (
    Busy,
    CommitUnknown,
    NotFound,
    PolicydError,
    UnknownDomain,
    XenStoreError,
)
from policyd.xstx import Tx, exists_request, is_enoent, mkdir_requests, write_request

__all__ = ["BackendNodes", "PhysicalDevice", "Tx", "VbdSpec", "XenStore"]
MAX_TX_ATTEMPTS = 16
MAX_DOMAINS = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class BackendNodes:
    """What libxl wrote for a vbd backend, validated."""

    params: str
    mode: str
    type: str
    frontend_id: int


@dataclass(frozen=True)
class PhysicalDevice:
    major: int
    minor: int
    device_path: str
    diskseq: int


@dataclass(frozen=True)
class VbdSpec:
    """A hot-plugged vbd: what Export writes for the frontend and backend."""

    backend_domid: int
    frontend_domid: int
    params: str
    mode: str
    physical: PhysicalDevice

    def backend_dir(self, devid: int) -> str:
        return backend_dir(self.backend_domid, self.frontend_domid, devid)

    def frontend_dir(self, devid: int) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{devid}"


class XenStore:
    """One lazily (re)connected pyxs client. Not thread-safe: use from one thread only."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._client: Any = None
        self.aborted = False

    def abort_pending(self) -> None:
        """From another thread: fail the requests the worker thread is blocked on.

        pyxs waits for a reply without a timeout, and its reader thread dies silently when
        xenstored goes away, so a request can block forever. This hands every pending request
        an EIO reply and makes further operations of the current call fail at once.
        """
        client = self._client
        if client is None:
            return
        self.aborted = True
        router = client.router
        for rq_id, rvar in list(router.rvars.items()):
            rvar.set(Packet(Op.ERROR, b"EIO\x00", rq_id, client.tx_id))

    @property
    def connected(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(PyXSError, OSError):
                client.close()

    def _connect(self) -> Any:
        if self._client is None:
            self.aborted = False
            client = Client(unix_socket_path=self.socket_path)
            try:
                client.connect()
            except (PyXSError, OSError) as e:
                raise XenStoreError(
                    f"cannot connect to xenstored at {self.socket_path} ({e}); "
                    "check that xenstored runs and that --xenstore-path is right"
                ) from None
            self._client = client
        return self._client

    def transact(self, body: Callable[[Tx], T]) -> T:
        """Run body in a transaction; retried when the commit conflicts."""
        for _attempt in range(MAX_TX_ATTEMPTS):
            client = self._connect()
            try:
                client.transaction()
                try:
                    result = body(Tx(client, self))
                except BaseException:
                    if not self.aborted:
                        client.rollback()
                    raise
                try:
                    committed = client.commit()
                except (PyXSError, OSError, ValueError) as e:
                    self.close()
                    raise CommitUnknown(
                        f"XenStore failed during a commit ({e}); it may have been applied"
                    ) from None
                if committed:
                    return result
            except PolicydError:
                if self.aborted:
                    self.close()
                raise
            except (PyXSError, OSError, ValueError) as e:
                self.close()
                raise XenStoreError(f"XenStore operation failed: {e}") from None
        raise XenStoreError(
            f"XenStore transaction conflicted {MAX_TX_ATTEMPTS} times in a row; retry later"
        )

    def read_one(self, path: str) -> str | None:
        return self.transact(lambda tx: tx.read(path))

    # -- domains ---------------------------------------------------------------------------

    def find_domain(self, name: str) -> int:
        """Domain id of the running domain called `name` (from /local/domain/*/name)."""
        return self.transact(lambda tx: domid_named(tx, name))

    def domain_name(self, domid: int) -> str:
        """The domain's validated name, or "" when it has none or a malformed one."""
        return self.transact(lambda tx: names_of(tx, [domid])[0])

    def find_export_domains(self, frontend: str, backend_domid: int) -> tuple[int, str]:
        """Export's reads in one transaction: the frontend's domid and the backend's name."""

        def body(tx: Tx) -> tuple[int, str]:
            return domid_named(tx, frontend), names_of(tx, [backend_domid])[0]

        return self.transact(body)

    # -- libxl-made backends (Attach) --------------------------------------------------------

    def read_backend(self, be: validate.BackendPath) -> tuple[BackendNodes, str, str]:
        """What libxl wrote for the backend, and the frontend's and backend's domain names,
        read in one transaction (pipelined)."""

        def body(tx: Tx) -> tuple[BackendNodes, str, str]:
            names = ("params", "mode", "type", "frontend-id")
            name_paths = [f"/local/domain/{d}/name" for d in (be.frontend_domid, be.backend_domid)]
            found = tx.read_many([f"{be.path}/{name}" for name in names] + name_paths)
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
            )
            return nodes, valid_name(found[len(names)]), valid_name(found[len(names) + 1])

        return self.transact(body)

    def write_physical_device(self, be_path: str, phys: PhysicalDevice) -> None:
        """The trio and hotplug-status = connected (what a hotplug script's success() writes),
        in one transaction, sent as one batch behind the check that the backend still exists
        (if it does not, the transaction is rolled back: nothing is written)."""

        def body(tx: Tx) -> None:
            nodes = [*physical_nodes(phys), ("hotplug-status", "connected")]
            exists, *written = tx.batch(
                [exists_request(be_path), *(write_request(f"{be_path}/{n}", v) for n, v in nodes)]
            )
            if is_enoent(exists):
                raise NotFound(f"{be_path} disappeared while attaching; nothing was written")
            for reply in [exists, *written]:
                if isinstance(reply, PyXSError):
                    raise reply

        self.transact(body)

    def remove_physical_device(self, be_path: str) -> None:
        """Remove the trio (a node already gone, or the whole backend, is no error)."""
        self.transact(lambda tx: tx.rm_many([f"{be_path}/{n}" for n, _ in physical_nodes(None)]))

    # -- hot-plug vbds (Export) ---------------------------------------------------------------

    def add_vbd(self, spec: VbdSpec, devid: int | None) -> int:
        """Write FE and BE nodes (with the physical-device trio) in one transaction.

        devid None: the first free xvd device number from xvdb. Returns the devid used.
        """

        def body(tx: Tx) -> int:
            # the first candidate's check also asks for the parents (one round trip)
            first = devid if devid is not None else validate.hotplug_devids()[0]
            be_dir, fe_dir, *parents = tx.exists_many(
                [spec.backend_dir(first), spec.frontend_dir(first), *vbd_parents(spec)]
            )
            if devid is not None:
                if be_dir or fe_dir:
                    raise Busy(f"devid {devid} is in use in domain {spec.frontend_domid}")
                chosen = devid
            elif not (be_dir or fe_dir):
                chosen = first
            else:
                later = validate.hotplug_devids()[1:]
                chosen = next((d for d in later if not vbd_in_use(tx, spec, d)), 0)
                if not chosen:
                    raise Busy(f"no free xvd device number in domain {spec.frontend_domid}")
            write_vbd(tx, spec, chosen, (parents[0], parents[1]))
            return chosen

        return self.transact(body)

    def remove_vbd(self, spec: VbdSpec, devid: int) -> None:
        self.transact(lambda tx: tx.rm_many([spec.backend_dir(devid), spec.frontend_dir(devid)]))

    def set_backend_closing(self, be_path: str) -> None:
        """Ask blkback to disconnect (online=0, state=Closing) before the nodes go away."""

        def body(tx: Tx) -> None:
            if tx.exists(be_path):
                tx.write_many(
                    [(f"{be_path}/online", "0"), (f"{be_path}/state", str(XENBUS_STATE_CLOSING))]
                )

        self.transact(body)


def valid_name(untrusted: str | None) -> str:
    """A domain's validated name, or "" when it has none or a malformed one."""
    try:
        return validate.domain_name(untrusted, XenStoreError)
    except XenStoreError:
        return ""


def names_of(tx: Tx, domids: list[int]) -> list[str]:
    return [valid_name(n) for n in tx.read_many([f"/local/domain/{d}/name" for d in domids])]


def domid_named(tx: Tx, name: str) -> int:
    """The one running domain called `name` (every /local/domain/*/name, read pipelined)."""
    domids = []
    for entry in tx.children("/local/domain")[:MAX_DOMAINS]:
        try:
            domids.append(validate.domid(entry))
        except XenStoreError:
            continue  # junk under /local/domain is not a domain
    untrusted = tx.read_many([f"/local/domain/{d}/name" for d in domids])
    found = [d for d, n in zip(domids, untrusted, strict=True) if n == name]
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


def vbd_in_use(tx: Tx, spec: VbdSpec, devid: int) -> bool:
    return any(tx.exists_many([spec.backend_dir(devid), spec.frontend_dir(devid)]))


def vbd_parents(spec: VbdSpec) -> tuple[str, str]:
    be, fe = spec.backend_domid, spec.frontend_domid
    return f"/local/domain/{be}/backend/vbd/{fe}", f"/local/domain/{fe}/device/vbd"


def write_vbd(
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
        parents_exist = (tx.exists(be_parent), tx.exists(fe_parent))
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
    fe_nodes = [
        ("backend", be_dir),
        ("backend-id", str(be)),
        ("state", str(XENBUS_STATE_INITIALISING)),
        ("virtual-device", str(devid)),
        ("device-type", "disk"),
    ]
    tx.run(
        [
            *(r for path, perms in dirs for r in mkdir_requests(path, perms)),
            *(write_request(f"{be_dir}/{n}", v) for n, v in be_nodes),
            *(write_request(f"{fe_dir}/{n}", v) for n, v in fe_nodes),
        ]
    )
