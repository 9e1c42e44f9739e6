"""The export registry: held fds, read-only sharing and read-write exclusion.

Unprivileged policyd code; pure bookkeeping, no I/O except closing fds it owns. Everything in
here was validated before it arrived. Rules:
  - a backing (one file by (st_dev, st_ino), or one block device by major:minor) has one held
    fd; read-only exports of it share that fd (and so one loop device), refcounted; a backing
    also answers to its aliases: a file's loop device, or the file a held loop device is bound
    to, so the rules below hold whichever way the data is named;
  - a read-write export is never shared, and a backing is never exported read-write while any
    other export of it exists (Busy);
  - removing the last export of a backing hands its fd back to the caller to close, so
    AUTOCLEAR frees a loop device once blkback has let go too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from policyd.brokerclient import Identity
from policyd.errors import Busy
from policyd.exports.identity import NO_NAMES, DeviceNames
from policyd.names import export_path

BackingKey = tuple[str, int, int]  # ("file", st_dev, st_ino) or ("block", major, minor)

STATE_WAITING = "waiting-for-blkback"
STATE_CONNECTED = "connected"
STATE_NO_BLKBACK = "no-blkback"
STATE_BACKEND_IN_VM = "backend-in-vm"  # a VM's own device: its blkback, not dom0's sysfs


def file_key(st_dev: int, st_ino: int) -> BackingKey:
    return ("file", st_dev, st_ino)


def block_key(major: int, minor: int) -> BackingKey:
    return ("block", major, minor)


@dataclass(eq=False)
class Backing:
    key: BackingKey
    fd: int
    identity: Identity
    kind: str  # "file" (a loop device over a file) or "block"
    writable: bool
    # other keys naming the same data: a file backing's loop device (block key); a loop device
    # held as a block device: the file it is bound to (file key)
    aliases: tuple[BackingKey, ...] = ()
    # the device node's path, as sysfs names the device (policyd.exports.sources.device_path);
    # "" for a device in another domain
    device_path: str = ""
    users: set[int] = field(default_factory=set)
    # what sysfs names the device (dm name and uuid, kernel name): policyd.exports.identity
    names: DeviceNames = NO_NAMES

    @property
    def loop_device(self) -> str:
        """The loop device a file is bound to ("" for a block device or a VM's device)."""
        return self.device_path if self.kind == "file" else ""


@dataclass(eq=False)
class ExportRecord:
    """One export: what the D-Bus Export object shows, plus what Detach must undo."""

    number: int
    source: str
    backing: Backing
    backend_domid: int
    backend_domain: str
    frontend_domid: int
    frontend_domain: str
    devid: int
    backend_path: str
    mode: str
    since_us: int
    wrote_vbd: bool  # Export/ExportFd wrote the FE+BE nodes; Attach wrote only the trio
    state: str = STATE_WAITING

    @property
    def object_path(self) -> str:
        return export_path(self.number)


class Registry:
    """The exports by number and backend path, and their backings by key and alias; the rules
    in the module docstring are kept by shareable() and add()/remove()."""

    def __init__(self) -> None:
        self._exports: dict[int, ExportRecord] = {}
        self._backings: dict[BackingKey, Backing] = {}
        self._by_backend_path: dict[str, int] = {}
        self._aliases: dict[BackingKey, list[Backing]] = {}
        self._next_number = 1

    def __len__(self) -> int:
        return len(self._exports)

    def __iter__(self) -> Iterator[ExportRecord]:
        return iter(list(self._exports.values()))

    def get(self, number: int) -> ExportRecord | None:
        return self._exports.get(number)

    def by_backend_path(self, path: str) -> ExportRecord | None:
        number = self._by_backend_path.get(path)
        return None if number is None else self._exports[number]

    def shareable(self, key: BackingKey, writable: bool) -> Backing | None:
        """The held backing a new export of `key` must reuse, None for a fresh one, or Busy."""
        held = self._backings.get(key)
        candidates = ([held] if held else []) + self._aliases.get(key, [])
        if not candidates:
            return None
        if not writable:
            candidates.sort(key=lambda b: b.writable, reverse=True)  # report a writer first
        backing = candidates[0]
        if writable:
            raise Busy(
                f"{describe(key)} is already exported ({len(backing.users)} export(s)); "
                "a read-write export needs it exclusively: detach the others first"
            )
        if backing.writable:
            raise Busy(
                f"{describe(key)} is exported read-write; detach that export before "
                "exporting it again"
            )
        return backing

    def new_backing(
        self,
        key: BackingKey,
        fd: int,
        identity: Identity,
        kind: str,
        writable: bool,
        aliases: tuple[BackingKey, ...] = (),
        device_path: str = "",
        names: DeviceNames = NO_NAMES,
    ) -> Backing:
        if key in self._backings:
            raise AssertionError(f"backing {key} is already registered")
        others = tuple(a for a in aliases if a != key)
        return Backing(key, fd, identity, kind, writable, others, device_path, names=names)

    def resume_numbers(self, last: int) -> None:
        """Start-up: numbers go on after `last`, the highest given out before."""
        self._next_number = max(self._next_number, last + 1)

    def next_number(self) -> int:
        number = self._next_number
        self._next_number += 1
        return number

    def add(self, record: ExportRecord) -> None:
        backing = record.backing
        if self._backings.setdefault(backing.key, backing) is not backing:
            raise AssertionError(f"backing {backing.key} registered twice")
        if not backing.users:
            for alias in backing.aliases:
                self._aliases.setdefault(alias, []).append(backing)
        backing.users.add(record.number)
        self._exports[record.number] = record
        self._by_backend_path[record.backend_path] = record.number

    def remove(self, record: ExportRecord) -> int | None:
        """Forget the export; returns the backing's fd if this was its last user."""
        del self._exports[record.number]
        self._by_backend_path.pop(record.backend_path, None)
        backing = record.backing
        backing.users.discard(record.number)
        if backing.users:
            return None
        del self._backings[backing.key]
        for alias in backing.aliases:
            others = [b for b in self._aliases.pop(alias, []) if b is not backing]
            if others:
                self._aliases[alias] = others
        return backing.fd

    def held_fds(self) -> list[int]:
        return [b.fd for b in self._backings.values()]


def describe(key: BackingKey) -> str:
    kind, a, b = key
    if kind == "file":
        return f"file (dev {os.major(a)}:{os.minor(a)}, inode {b})"
    return f"block device {a}:{b}"
