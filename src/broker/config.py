"""The broker's own configuration: a root-owned TOML file that bounds what it will ever open.

TRUST LEVEL: runs as root at start-up, before the sandbox. The file is trusted only if it is
root-owned and not writable by group or others; anything else refuses to start (ConfigError).

    client_user = "blockbroker"            # name or numeric uid; only it may connect
    file_roots = ["/var/lib/blockbroker/images"]   # LOOP_FILE only below these
    block_majors = [7, 8, 259]             # OPEN_BLOCK only these majors
    landlock = "optional"                  # start without Landlock if the kernel has none
"""

import os
import pwd
import stat
import tomllib
from dataclasses import dataclass

KNOWN_KEYS = {"client_user", "file_roots", "block_majors", "root_without_block_device", "landlock"}


class ConfigError(Exception):
    """The configuration is unsafe or invalid; the broker does not start."""


@dataclass(frozen=True)
class Config:
    client_uid: int
    file_roots: tuple[str, ...]
    block_majors: frozenset[int]
    root_without_block_device: bool = False  # / is on 9p, overlay, btrfs...: start anyway
    landlock_optional: bool = False  # the kernel has no Landlock: start with seccomp alone


def resolve_uid(user: object) -> int:
    """client_user as a uid: a user name, or a numeric uid (as a number or a string)."""
    if isinstance(user, str) and not user.isdigit():
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ConfigError(f"client_user {user!r} does not exist") from None
    if type(user) not in (int, str) or not 0 <= int(str(user)) < 2**32 - 1:
        raise ConfigError("client_user must be a user name or a numeric uid")
    return int(str(user))


def check_file_root(root: object) -> str:
    if not isinstance(root, str) or not os.path.isabs(root) or not os.path.isdir(root):
        raise ConfigError(f"file root {root!r} must be an absolute path to a directory")
    if os.path.realpath(root) != os.path.normpath(root):
        raise ConfigError(f"file root {root} must not contain symlinks")
    return os.path.normpath(root)


def load_config(path: str) -> Config:
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                raise ConfigError(f"config {path} is not a regular file owned by root")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ConfigError(f"config {path} is writable by group or others")
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: {e}") from None
    roots, majors = data.get("file_roots", []), data.get("block_majors", [])
    if set(data) - KNOWN_KEYS or "client_user" not in data:
        raise ConfigError(f"config {path}: needs client_user, knows only {sorted(KNOWN_KEYS)}")
    if not isinstance(roots, list) or not isinstance(majors, list):
        raise ConfigError("file_roots and block_majors must be lists")
    if not all(type(m) is int and 0 < m < 4096 for m in majors):
        raise ConfigError("block_majors must be integers in 1..4095")
    diskless, landlock = data.get("root_without_block_device", False), data.get("landlock")
    if type(diskless) is not bool or landlock not in (None, "required", "optional"):
        raise ConfigError('root_without_block_device: true/false; landlock: "required"/"optional"')
    roots, uid = tuple(map(check_file_root, roots)), resolve_uid(data["client_user"])
    return Config(uid, roots, frozenset(majors), diskless, landlock == "optional")


def check_fail_closed(config: Config, root_devices: frozenset[int], landlock_abi: int) -> None:
    """Refuse to start without a protection the kernel or the system cannot give, unless the
    config says the admin knows: the root disk by number (btrfs, ZFS, overlay, 9p roots have no
    block device behind stat("/")), and Landlock (a kernel without it, or with it off)."""
    if not root_devices and not config.root_without_block_device:
        raise ConfigError("/ is on no block device; set root_without_block_device = true")
    if not landlock_abi and not config.landlock_optional:
        raise ConfigError('the kernel offers no Landlock; set landlock = "optional"')


def disk_of(dev: int) -> str | None:
    """The sysfs directory of the whole disk of block device `dev` (its own, or a partition's
    parent), or None if `dev` is no block device."""
    link = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    sysdir = os.path.realpath(link) if os.path.exists(link) else None
    if sysdir is None or not os.path.exists(os.path.join(sysdir, "partition")):
        return sysdir
    return os.path.dirname(sysdir)


def read_dev(path: str) -> int:
    """dev_t from a sysfs `dev` file ("major:minor\n")."""
    with open(path, "rb", buffering=0) as f:  # unbuffered: no isatty(), an ioctl the filter kills
        return os.makedev(*map(int, f.read(64).decode().split(":", 1)))


def root_disk_devices() -> frozenset[int]:
    """dev_t of the disks holding the root filesystem, all their partitions, and (for dm/md)
    the disks below them. OPEN_BLOCK never opens one of these."""
    forbidden, pending = set[int](), [os.stat("/").st_dev]
    while pending:
        sysdir = disk_of(pending.pop())
        if sysdir is None:
            continue  # e.g. a root on overlayfs or 9p: no block device to protect
        for entry in [sysdir, *(os.path.join(sysdir, n) for n in os.listdir(sysdir))]:
            if not os.path.isfile(os.path.join(entry, "dev")):
                continue
            forbidden.add(read_dev(os.path.join(entry, "dev")))
            slaves = os.path.join(entry, "slaves")
            for slave in os.listdir(slaves) if os.path.isdir(slaves) else []:
                dev = read_dev(os.path.join(slaves, slave, "dev"))
                pending += [] if dev in forbidden else [dev]
    return frozenset(forbidden)
