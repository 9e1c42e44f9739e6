"""XenStore access for policyd: validated reads, vbd node sets written in one transaction.

Unprivileged policyd code; XenStore content is validated here (through policyd.validate) before
anything else sees it. Every method blocks (pyxs is synchronous) and must run on the single
XenStore worker thread (see policyd.exporter), so one pyxs client is never used concurrently.
Transactions are retried on conflict (EAGAIN at commit), at most MAX_TX_ATTEMPTS times.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyxs import Client
from pyxs._internal import Op, Packet
from pyxs.exceptions import PyXSError

from policyd import validate
from policyd.errors import Busy, NotFound, PolicydError, UnknownDomain, XenStoreError

MAX_TX_ATTEMPTS = 16
MAX_VALUE_BYTES = 4096
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
        return f"/local/domain/{self.backend_domid}/backend/vbd/{self.frontend_domid}/{devid}"

    def frontend_dir(self, devid: int) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{devid}"


class Tx:
    """String-typed operations inside one transaction of one pyxs client."""

    def __init__(self, client: Any, owner: XenStore) -> None:
        self._client = client
        self._owner = owner

    @property
    def _c(self) -> Any:
        if self._owner.aborted:
            raise XenStoreError("XenStore stopped answering; the request was abandoned")
        return self._client

    def read(self, path: str) -> str | None:
        try:
            raw: bytes = self._c.read(path.encode())
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise
        if len(raw) > MAX_VALUE_BYTES:
            raise XenStoreError(f"{path}: value longer than {MAX_VALUE_BYTES} bytes")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XenStoreError(f"{path}: value is not ASCII") from None
        if not text.isprintable():
            raise XenStoreError(f"{path}: value contains control characters")
        return text

    def exists(self, path: str) -> bool:
        return bool(self._c.exists(path.encode()))

    def children(self, path: str) -> list[str]:
        try:
            names: list[bytes] = self._c.list(path.encode())
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return []
            raise
        return [n.decode("ascii", "replace") for n in names]

    def write(self, path: str, value: str) -> None:
        self._c.write(path.encode(), value.encode("ascii"))

    def write_all(self, base: str, nodes: Iterable[tuple[str, str]]) -> None:
        for name, value in nodes:
            self.write(f"{base}/{name}", value)

    def mkdir(self, path: str, perms: list[str]) -> None:
        self._c.mkdir(path.encode())
        self._c.set_perms(path.encode(), [p.encode() for p in perms])

    def rm(self, path: str) -> None:
        try:
            self._c.delete(path.encode())
        except PyXSError as e:
            if not (e.args and e.args[0] == errno.ENOENT):
                raise


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
                if client.commit():
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

        def body(tx: Tx) -> list[int]:
            found = []
            entries = tx.children("/local/domain")[:MAX_DOMAINS]
            for entry in entries:
                try:
                    domid = validate.domid(entry)
                except XenStoreError:
                    continue  # junk under /local/domain is not a domain
                if tx.read(f"/local/domain/{domid}/name") == name:
                    found.append(domid)
            return found

        found = self.transact(body)
        if not found:
            raise UnknownDomain(f"no running domain is named {name!r}; check `xl list`")
        if len(found) > 1:
            raise XenStoreError(f"several domains are named {name!r} ({found}); refusing")
        return found[0]

    def domain_name(self, domid: int) -> str:
        """The domain's validated name, or "" when it has none or a malformed one."""
        untrusted = self.read_one(f"/local/domain/{domid}/name")
        try:
            return validate.domain_name(untrusted, XenStoreError)
        except XenStoreError:
            return ""

    # -- libxl-made backends (Attach) --------------------------------------------------------

    def read_backend(self, be: validate.BackendPath) -> BackendNodes:
        def body(tx: Tx) -> BackendNodes:
            values = {}
            for name in ("params", "mode", "type", "frontend-id"):
                value = tx.read(f"{be.path}/{name}")
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
            return BackendNodes(
                params,
                validate.mode(values["mode"]),
                validate.backend_type(values["type"]),
                frontend_id,
            )

        return self.transact(body)

    def write_physical_device(self, be_path: str, phys: PhysicalDevice) -> None:
        def body(tx: Tx) -> None:
            if not tx.exists(be_path):
                raise NotFound(f"{be_path} disappeared while attaching; nothing was written")
            tx.write_all(be_path, physical_nodes(phys))

        self.transact(body)

    def remove_physical_device(self, be_path: str) -> None:
        def body(tx: Tx) -> None:
            if tx.exists(be_path):
                for name, _ in physical_nodes(None):
                    tx.rm(f"{be_path}/{name}")

        self.transact(body)

    # -- hot-plug vbds (Export) ---------------------------------------------------------------

    def add_vbd(self, spec: VbdSpec, devid: int | None) -> int:
        """Write FE and BE nodes (with the physical-device trio) in one transaction.

        devid None: the first free xvd device number from xvdb. Returns the devid used.
        """

        def body(tx: Tx) -> int:
            if devid is not None:
                if vbd_in_use(tx, spec, devid):
                    raise Busy(f"devid {devid} is in use in domain {spec.frontend_domid}")
                chosen = devid
            else:
                free = (d for d in validate.hotplug_devids() if not vbd_in_use(tx, spec, d))
                chosen = next(free, 0)
                if not chosen:
                    raise Busy(f"no free xvd device number in domain {spec.frontend_domid}")
            write_vbd(tx, spec, chosen)
            return chosen

        return self.transact(body)

    def remove_vbd(self, spec: VbdSpec, devid: int) -> None:
        def body(tx: Tx) -> None:
            tx.rm(spec.backend_dir(devid))
            tx.rm(spec.frontend_dir(devid))

        self.transact(body)

    def set_backend_closing(self, be_path: str) -> None:
        """Ask blkback to disconnect (online=0, state=Closing) before the nodes go away."""

        def body(tx: Tx) -> None:
            if tx.exists(be_path):
                tx.write(f"{be_path}/online", "0")
                tx.write(f"{be_path}/state", str(XENBUS_STATE_CLOSING))

        self.transact(body)


XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6


def physical_nodes(phys: PhysicalDevice | None) -> list[tuple[str, str]]:
    if phys is None:
        return [("physical-device", ""), ("physical-device-path", ""), ("diskseq", "")]
    return [
        ("physical-device", f"{phys.major:x}:{phys.minor:x}"),
        ("physical-device-path", phys.device_path),
        ("diskseq", f"{phys.diskseq:x}"),
    ]


def vbd_in_use(tx: Tx, spec: VbdSpec, devid: int) -> bool:
    return tx.exists(spec.backend_dir(devid)) or tx.exists(spec.frontend_dir(devid))


def write_vbd(tx: Tx, spec: VbdSpec, devid: int) -> None:
    """The node set libxl's device_disk_add writes, plus the physical-device trio.

    Permissions as libxl sets them: the backend side is owned by the backend domain and readable
    by the frontend; the frontend side is owned by the frontend and readable by the backend.
    Parents are created with those permissions first (nodes inherit their parent's).
    """
    be, fe = spec.backend_domid, spec.frontend_domid
    be_parent = f"/local/domain/{be}/backend/vbd/{fe}"
    fe_parent = f"/local/domain/{fe}/device/vbd"
    if not tx.exists(be_parent):
        tx.mkdir(be_parent, [f"n{be}", f"r{fe}"])
    if not tx.exists(fe_parent):
        tx.mkdir(fe_parent, [f"n{fe}", f"r{be}"])
    be_dir, fe_dir = spec.backend_dir(devid), spec.frontend_dir(devid)
    tx.mkdir(be_dir, [f"n{be}", f"r{fe}"])
    tx.mkdir(fe_dir, [f"n{fe}", f"r{be}"])
    tx.write_all(
        be_dir,
        [
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
        ],
    )
    tx.write_all(
        fe_dir,
        [
            ("backend", be_dir),
            ("backend-id", str(be)),
            ("state", str(XENBUS_STATE_INITIALISING)),
            ("virtual-device", str(devid)),
            ("device-type", "disk"),
        ],
    )
