"""Which block device a path names, by what sysfs says: device-mapper names, partitions, disks.

Unprivileged policyd code; reads sysfs (world-readable) and resolves paths policyd can see, opens
no device. The broker opens a block path and reports the major:minor and diskseq of what it
opened; `verify` then checks, with that fd held, that this device is the one the path names:

  - /dev/mapper/NAME, /dev/disk/by-id/dm-name-NAME: sysfs dm/name is NAME;
  - /dev/VG/LV (two components, the device a device-mapper one): dm/name is LVM's
    VG-LV, each '-' inside VG and LV doubled (LVM's mangling);
  - /dev/disk/by-id/dm-uuid-UUID, and the Export option dm-uuid: dm/uuid is UUID (LVM's is
    LVM-<vg uuid><lv uuid>: a volume removed and recreated under its name has another);
  - /dev/KNAME (sdb1, nvme0n1p2, dm-3, loop0p1): if sysfs has a block device KNAME, its `dev`
    is the opened major:minor;
  - a partition: its kernel name is its disk's name plus its number (with a 'p' after a
    trailing digit), and the disk's sysfs diskseq is the one the broker read (BLKGETDISKSEQ of a
    partition is its disk's);
  - a symlink policyd can resolve: the same rules apply to its target (/dev/VG/LV ->
    /dev/mapper/VG-LV or /dev/dm-N).

Why after the open is sound: the held fd pins the device. A dm device that is open cannot be
removed (`dmsetup remove` fails with EBUSY; a deferred remove waits for the last close, and its
name stays taken until then), a partition that is open cannot be deleted (BLKPG: EBUSY), and a
whole disk's major:minor is not given to another disk while an fd holds it. dm names and uuids
are unique among live devices, so a held device whose dm/name is NAME is the device named NAME
now. A rename after the open shows up as a mismatch (refused, fail closed). Whatever changed
between policyd's request-time stat and the broker's open is caught by the major:minor and
diskseq the broker compares (diskseq is never reused during uptime; dm gives a recreated device
the lowest free minor, often the same one, but always a new diskseq).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from policyd import errors

MAX_SYSFS_VALUE = 256  # dm names are < 128 bytes, uuids < 129
DM_UUID_MAX = 128  # DM_UUID_LEN - 1
# /dev directories whose two-component paths are not LVM's /dev/VG/LV (udev's /dev/block/M:m
# links to dm-N too); LVM refuses these as VG names where they clash with /dev
NOT_VOLUME_GROUPS = frozenset({"block", "char", "disk", "md", "mapper"})


@dataclass(frozen=True)
class DeviceNames:
    """What sysfs names a block device: kernel name, its disk, partition number, dm name/uuid."""

    kernel_name: str = ""  # sdb1, dm-3, loop0p1
    disk: str = ""  # the whole disk's kernel name (itself for a whole disk)
    partition: int = 0  # 0 for a whole disk
    dm_name: str = ""  # "" unless a device-mapper device
    dm_uuid: str = ""
    disk_diskseq: int | None = None  # the whole disk's sysfs diskseq; None if sysfs has none


NO_NAMES = DeviceNames()  # a file's loop device, or a device sysfs could not name


def lvm_dm_name(vg: str, lv: str) -> str:
    """LVM's device-mapper name of VG/LV: '-' inside each name doubled, then VG-LV."""
    return vg.replace("-", "--") + "-" + lv.replace("-", "--")


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_SYSFS_VALUE).decode("utf-8", "surrogateescape").rstrip("\n")


def _read_optional(path: str) -> str | None:
    try:
        return _read(path)
    except FileNotFoundError:
        return None


def names_or_empty(major: int, minor: int, sysfs_root: str = "/sys") -> DeviceNames:
    """read_names, or no names if sysfs cannot say (shown as "" only; checks use verify)."""
    try:
        return read_names(major, minor, sysfs_root)
    except (errors.DeviceChanged, OSError, ValueError):
        return NO_NAMES


def policy_path(path: str, sysfs_root: str = "/sys") -> tuple[str, tuple[int, int] | None]:
    """The path the export policy judges, and the device the open must then find.

    The policy names block devices by kernel name (`dm-3`, `sdb1`: policyd.policy.tokens). A
    /dev path of more than one component (/dev/VG/LV, /dev/mapper/NAME, /dev/disk/by-id/...)
    is judged as the kernel name of the block device it leads to now (/dev/dm-3), and that
    major:minor is pinned: the open refuses another (DeviceChanged). Any other path, or one
    policyd cannot stat, is judged as it is (None: nothing pinned)."""
    if not path.startswith("/dev/") or "/" not in path[len("/dev/") :]:
        return path, None
    try:
        st = os.stat(path)
    except OSError:
        return path, None
    if not stat.S_ISBLK(st.st_mode):
        return path, None
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    names = names_or_empty(*dev, sysfs_root)
    return ("/dev/" + names.kernel_name, dev) if names.kernel_name else (path, None)


def read_names(major: int, minor: int, sysfs_root: str = "/sys") -> DeviceNames:
    """The sysfs names of block device major:minor; DeviceChanged if sysfs has no such device."""
    link = f"{sysfs_root}/dev/block/{major}:{minor}"
    try:
        node = os.path.realpath(link, strict=True)
        dev = _read(f"{node}/dev")
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
        raise errors.DeviceChanged(f"sysfs has no block device {major}:{minor}") from None
    if dev != f"{major}:{minor}":
        raise errors.DeviceChanged(f"sysfs's {link} is the device {dev}, not {major}:{minor}")
    name = os.path.basename(node)
    part_text = _read_optional(f"{node}/partition")
    disk_dir = os.path.dirname(node) if part_text is not None else node
    seq_text = _read_optional(f"{disk_dir}/diskseq")
    return DeviceNames(
        kernel_name=name,
        disk=os.path.basename(disk_dir),
        partition=int(part_text) if part_text is not None else 0,
        dm_name=_read_optional(f"{node}/dm/name") or "",
        dm_uuid=_read_optional(f"{node}/dm/uuid") or "",
        disk_diskseq=int(seq_text) if seq_text else None,
    )


def named_by(path: str) -> tuple[str, str]:
    """What `path` itself claims, lexically: ("dm-name" | "dm-uuid" | "lvm" | "kernel", value),
    or ("", "") for a path that names no device by itself (/dev/disk/by-path/..., /tmp/x)."""
    parts = path.split("/")[1:]
    if len(parts) < 2 or parts[0] != "dev":
        return ("", "")
    rest = parts[1:]
    if len(rest) == 1:
        return ("kernel", rest[0])
    if len(rest) == 2 and rest[0] == "mapper":
        return ("dm-name", rest[1])
    if len(rest) == 2 and rest[0] not in NOT_VOLUME_GROUPS:
        return ("lvm", lvm_dm_name(rest[0], rest[1]))
    if rest[:2] == ["disk", "by-id"] and len(rest) == 3:
        for prefix, kind in (("dm-name-", "dm-name"), ("dm-uuid-", "dm-uuid")):
            if rest[2].startswith(prefix):
                return (kind, rest[2][len(prefix) :])
    return ("", "")


def _kernel_dev(name: str, sysfs_root: str) -> str | None:
    """The `dev` (MAJ:MIN) of the block device sysfs calls `name`; None if it has none."""
    if "/" in name or name in (".", ".."):
        return None
    try:
        return _read(f"{sysfs_root}/class/block/{name}/dev")
    except OSError:
        return None


def _check_claim(
    path: str, claim: tuple[str, str], dev: tuple[int, int], names: DeviceNames, sysfs_root: str
) -> None:
    kind, value = claim
    shown = f"{dev[0]}:{dev[1]}"
    if kind == "kernel":
        named = _kernel_dev(value, sysfs_root)
        if named is not None and named != shown:
            raise errors.DeviceChanged(
                f"{path} names {value}, which is {named}, but the device opened is {shown} "
                f"({names.kernel_name}); retry"
            )
    elif kind in ("dm-name", "lvm") and (kind == "dm-name" or names.dm_name):
        if names.dm_name != value:
            got = f"device-mapper device {names.dm_name!r}" if names.dm_name else "no dm device"
            raise errors.DeviceChanged(
                f"{path} names the device-mapper device {value!r}, but the device opened "
                f"({shown}, {names.kernel_name}) is {got}: renamed or replaced; retry"
            )
    elif kind == "dm-uuid":
        check_uuid(path, value, dev, names)


def check_uuid(path: str, expected: str, dev: tuple[int, int], names: DeviceNames) -> None:
    if names.dm_uuid != expected:
        raise errors.DeviceChanged(
            f"{path}: expected the device-mapper uuid {expected!r}, but the device opened "
            f"({dev[0]}:{dev[1]}, {names.dm_name or names.kernel_name}) has "
            f"{names.dm_uuid or 'none'}: removed and recreated, or another volume; retry"
        )


def verify(
    path: str,
    major: int,
    minor: int,
    diskseq: int,
    expect_dm_uuid: str = "",
    sysfs_root: str = "/sys",
) -> DeviceNames:
    """Checks that the held device major:minor (diskseq as the broker read it) is the one
    `path` names (module docstring); its names, or DeviceChanged."""
    dev = (major, minor)
    names = read_names(major, minor, sysfs_root)
    if names.partition:
        sep = "p" if names.disk[-1:].isdigit() else ""
        if names.kernel_name != f"{names.disk}{sep}{names.partition}":
            raise errors.DeviceChanged(
                f"sysfs's partition {names.kernel_name} is number {names.partition} of "
                f"{names.disk}, which does not name it; refusing {path}"
            )
    if diskseq and names.disk_diskseq is not None and names.disk_diskseq != diskseq:
        raise errors.DeviceChanged(
            f"{path}: the disk {names.disk} now has diskseq {names.disk_diskseq}, not the "
            f"{diskseq} of the device opened: it was replaced; retry"
        )
    claims = [named_by(path)] if path else []
    try:
        target = os.path.realpath(path, strict=True) if path else path
    except OSError:
        target = path  # policyd cannot see it (its sandbox): the lexical claim stands alone
    if target != path:
        claims.append(named_by(target))
    for claim in claims:
        _check_claim(path, claim, dev, names, sysfs_root)
    if expect_dm_uuid:
        check_uuid(path, expect_dm_uuid, dev, names)
    return names
