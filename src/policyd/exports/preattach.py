"""The watch on dom0's vbd backends: an Attach started before libxl's hotplug script asks for it.

Unprivileged policyd code. libxl writes a disk's backend nodes (params, mode, script, ...) in one
transaction, then waits for blkback to reach InitWait, then spawns the hotplug script; for
`script=blockbroker-block` that script's only work is policyd's Attach. policyd watches the
backend domain's `backend/vbd` tree and starts that Attach as soon as such a backend appears, so
the script's own Attach finds it done (or waits on the exporter's lock while it is in flight) and
returns the same export: the same record, the same held and verified loop device, one per
backend.

Trust: only dom0's privileged toolstack can write the backend domain's backend tree (xenstored
gives guests no write access there), the same principal the script's uid-0-only Attach trusts;
the pre-attach runs the same policy check, opens through the broker and writes in the same
transaction as Attach. Events carry only a path; what is read is validated by
policyd.xenstore.store. A pre-attached export nobody claims is released: when its backend
directory is removed, or after `claim_s` seconds (policyd.exports.exporter, `release_unclaimed`).

The same watch starts the Detach of libxl's remove: libxl begins it by writing `online` = 0
(with state Closing) in one transaction, waits for blkback to close, runs the script's
`remove` (whose failure it ignores) and deletes the backend. An Attach export whose backend's
`online` turns 0 is detached then, so the script's Detach finds it done (NotFound: success).
The loop device stays bound while blkback still holds it (AUTOCLEAR frees it on the last close).
An Attach export whose backend dir goes with no Detach and no pre-detach (`online` = 0 came
while policyd was away, or the dir was deleted without it) is detached after a short grace
(exporter, `_release_gone`).

Events: a watch on the tree fires for every node written below it (libxl's nodes, policyd's own
trio, blkback's state): each is reduced to its backend directory, deduplicated, and handled by
one sweep task, so a burst costs one read per new backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from policyd import errors, logfmt

PRE_ATTACH_TOKEN = "vbd-backends"
MAX_PENDING = 4096  # distinct backend dirs waiting for the sweep (dom0 writes them; a bound)

AT_DIR = 1  # an event on the backend dir itself: a creation or a removal
ONLINE = 2  # an event on its `online` node: libxl writes online=0 when it removes the device
# (backend dir, AT_DIR | ONLINE bits seen) -> None
BackendHandler = Callable[[str, int], Awaitable[None]]


class BackendWatch:
    """One XenStore watch on /local/domain/<backend>/backend/vbd. Events below a backend dir go
    to `on_backend(dir, flags)`; events on the root or a frontend's dir (a whole subtree
    removed) to `on_subtree(path)`."""

    def __init__(
        self,
        backend_domid: int,
        on_backend: BackendHandler,
        on_subtree: Callable[[str], Awaitable[None]],
    ) -> None:
        self.root = f"/local/domain/{backend_domid}/backend/vbd"
        self._on_backend = on_backend
        self._on_subtree = on_subtree
        self._dirty: dict[str, int] = {}  # backend dir -> AT_DIR | ONLINE bits
        self._subtrees: set[str] = set()
        self._sweep_task: asyncio.Task[None] | None = None
        self._overflowed = False

    def event(self, path: str, token: str) -> None:
        """A watch fired (on the event loop): note the backend dir, sweep in one task."""
        if token != PRE_ATTACH_TOKEN or not path.startswith(self.root):
            return
        rest = path[len(self.root) :]
        if rest and not rest.startswith("/"):
            return  # a sibling such as .../backend/vbd2
        parts = rest.split("/", 3)[1:]  # [fe, devid, node]
        if len(parts) < 2:
            if len(parts) == 1 and not (parts[0].isdecimal() and len(parts[0]) < 6):
                return
            if len(self._subtrees) < MAX_PENDING:
                self._subtrees.add(path)
        else:
            fe, devid = parts[0], parts[1]
            if not (fe.isdecimal() and devid.isdecimal() and len(fe) < 6 and len(devid) < 10):
                return
            be_dir = f"{self.root}/{fe}/{devid}"
            if be_dir not in self._dirty and len(self._dirty) >= MAX_PENDING:
                if not self._overflowed:
                    logfmt.warning("too many backend events at once; some not pre-attached")
                    self._overflowed = True
                return
            flags = AT_DIR if len(parts) == 2 else ONLINE if parts[2] == "online" else 0
            self._dirty[be_dir] = self._dirty.get(be_dir, 0) | flags
        if self._sweep_task is None or self._sweep_task.done():
            self._sweep_task = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._dirty or self._subtrees:
            try:
                if self._dirty:
                    be_dir = next(iter(self._dirty))
                    await self._on_backend(be_dir, self._dirty.pop(be_dir))
                else:
                    await self._on_subtree(self._subtrees.pop())
            except errors.PolicydError as e:
                # the script's own Attach runs the same steps and reports this to libxl
                logfmt.info("no pre-attach", error=e)
        self._overflowed = False

    def stop(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
