"""Custody of the fds policyd holds: each is also in systemd's fd store, under a name.

Unprivileged policyd code. A held fd keeps a loop device bound (AUTOCLEAR) and a number named
in XenStore from being reused until blkback has its own reference. A copy of every held fd goes
to the service manager's fd store (FDSTORE=1, FDNAME from `fd_name`) as soon as policyd holds
it, and is removed (FDSTOREREMOVE=1) when policyd lets go, so a crash or a restart of policyd
does not let the kernel free a device that XenStore still names (policyd.exports.reconcile takes
them back). Without a service manager (no NOTIFY_SOCKET) this only counts. The store's size is
FileDescriptorStoreMax=; policyd refuses new devices before it would be exceeded, because
systemd closes fds over the limit with only a log line.
"""

from __future__ import annotations

import os

from policyd import errors, logfmt
from policyd.brokerclient import Identity
from policyd.exports.fdstore import FdStore

FDNAME_PREFIX = "bb1"  # names: bb1-<kind>-<major>-<minor>-<diskseq hex>
DEFAULT_STORE_MAX = 1024  # FileDescriptorStoreMax= in blockbroker-policyd.service


def fd_name(kind: str, ident: Identity) -> str:
    """The store name of a held fd: what it is, by device number and diskseq (printable
    ASCII, no ':', far under 255 characters)."""
    return f"{FDNAME_PREFIX}-{kind}-{ident.major}-{ident.minor}-{ident.diskseq:x}"


class Custody:
    """Pushes held fds to the fd store and takes them out again; bounded by `store_max`."""

    def __init__(self, store: FdStore, store_max: int = DEFAULT_STORE_MAX) -> None:
        self.store = store
        self.store_max = store_max
        self.held: dict[str, int] = {}  # name -> fd, as policyd holds them

    def check_room(self) -> None:
        """Busy if one more held device would not fit the fd store."""
        if len(self.held) >= self.store_max:
            raise errors.Busy(
                f"policyd holds {len(self.held)} devices, the most its fd store keeps "
                f"(FileDescriptorStoreMax={self.store_max}); detach some exports first"
            )

    def hold(self, name: str, fd: int) -> None:
        """Policyd holds `fd` from now on: a copy goes to the store under `name`."""
        self.held[name] = fd
        try:
            self.store.push(fd, name)
        except (OSError, ValueError) as e:
            # The export stands; only a restart before its blkback opens it would lose it.
            logfmt.error("cannot push a held fd to the fd store", fd_name=name, error=e)

    def adopt(self, name: str, fd: int) -> None:
        """An fd the store handed back at start-up: held again (the store has it already)."""
        self.held[name] = fd

    def unhold(self, name: str) -> None:
        """Undo hold() (the step it guarded failed): out of the store; the caller closes."""
        self.held.pop(name, None)
        self._remove(name)

    def rename(self, old: str, new: str, fd: int) -> None:
        """A stored fd held again under another name: systemd keeps a re-pushed fd under its
        old name, so the old entry goes first."""
        self._remove(old)
        self.hold(new, fd)

    def release(self, name: str) -> None:
        """Policyd lets go: the store's copy is removed, then policyd's own fd is closed."""
        fd = self.held.pop(name, None)
        self._remove(name)
        if fd is not None:
            os.close(fd)

    def _remove(self, name: str) -> None:
        try:
            self.store.remove(name)
        except (OSError, ValueError) as e:
            logfmt.error("cannot remove an fd from the fd store", fd_name=name, error=e)

    def close_all(self) -> None:
        """policyd stops: its own fds close; the store keeps its copies for the next start."""
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()
