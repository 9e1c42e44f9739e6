"""The broker's own configuration: a root-owned TOML file that bounds what it will ever open.

TRUST LEVEL: runs as root at start-up, before the sandbox. The file is trusted only if it is
root-owned and not writable by group or others; anything else refuses to start (ConfigError).

    client_user = "blockbroker"            # name or numeric uid; only it may connect
    file_roots = ["/var/lib/blockbroker/images"]   # LOOP_FILE only below these
    block_majors = [7, 8, 259]             # OPEN_BLOCK only these majors
"""

from __future__ import annotations

import os
import pwd
import stat
import tomllib
from dataclasses import dataclass

KNOWN_KEYS = {"client_user", "file_roots", "block_majors"}


class ConfigError(Exception):
    """The configuration is unsafe or invalid; the broker does not start."""


@dataclass(frozen=True)
class Config:
    client_uid: int
    file_roots: tuple[str, ...]
    block_majors: frozenset[int]


def resolve_uid(user: object) -> int:
    if isinstance(user, int) and not isinstance(user, bool) and 0 <= user < 2**32 - 1:
        return user
    if isinstance(user, str) and user.isdigit():
        return resolve_uid(int(user))
    if isinstance(user, str) and user:
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ConfigError(f"client_user {user!r} does not exist") from None
    raise ConfigError("client_user must be a user name or a numeric uid")


def check_file_root(root: object) -> str:
    if not isinstance(root, str) or not os.path.isabs(root) or "\0" in root:
        raise ConfigError(f"file root {root!r} must be an absolute path")
    root = os.path.normpath(root)
    if os.path.realpath(root) != root:
        raise ConfigError(f"file root {root} must not contain symlinks")
    if not os.path.isdir(root):
        raise ConfigError(f"file root {root} is not a directory")
    return root


def load_config(path: str) -> Config:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"cannot open config {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config {path} is not a regular file")
        if st.st_uid != 0:
            raise ConfigError(f"config {path} is not owned by root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"config {path} is writable by group or others")
        try:
            data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {path}: {e}") from None
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {sorted(unknown)}")
    roots = data.get("file_roots", [])
    majors = data.get("block_majors", [])
    if not isinstance(roots, list) or not isinstance(majors, list):
        raise ConfigError("file_roots and block_majors must be lists")
    if not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m < 4096 for m in majors):
        raise ConfigError("block_majors must be integers in 1..4095")
    if "client_user" not in data:
        raise ConfigError("client_user is required")
    return Config(
        client_uid=resolve_uid(data["client_user"]),
        file_roots=tuple(check_file_root(r) for r in roots),
        block_majors=frozenset(majors),
    )


def block_device_of(dev: int) -> str | None:
    """The sysfs directory of block device `dev`, or None if it is not one."""
    link = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    return os.path.realpath(link) if os.path.exists(link) else None


def read_dev(path: str) -> int:
    """dev_t from a sysfs `dev` file ("major:minor")."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        major, minor = os.read(fd, 64).decode().split(":")
    finally:
        os.close(fd)
    return os.makedev(int(major), int(minor))


def root_disk_devices() -> frozenset[int]:
    """dev_t of the disks holding the root filesystem, all their partitions, and (for dm/md)
    the disks below them. OPEN_BLOCK never opens one of these."""
    forbidden: set[int] = set()
    pending = [os.stat("/").st_dev]
    while pending:
        sysdir = block_device_of(pending.pop())
        if sysdir is None:
            continue  # e.g. a root on overlayfs or 9p: no block device to protect
        if os.path.exists(os.path.join(sysdir, "partition")):
            sysdir = os.path.dirname(sysdir)  # the whole disk
        for entry in [sysdir, *(os.path.join(sysdir, n) for n in os.listdir(sysdir))]:
            if not os.path.isfile(os.path.join(entry, "dev")):
                continue
            forbidden.add(read_dev(os.path.join(entry, "dev")))
            slaves = os.path.join(entry, "slaves")
            for slave in os.listdir(slaves) if os.path.isdir(slaves) else []:
                dev = read_dev(os.path.join(slaves, slave, "dev"))
                pending += [] if dev in forbidden else [dev]
    return frozenset(forbidden)
