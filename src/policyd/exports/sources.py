"""Opening what is exported: paths and caller fds through the broker, shared where allowed.

Unprivileged policyd code; paths arrive validated (policyd.validate), caller fds unverified.
policyd never opens a path itself: an lstat (which may be denied) finds a sharing candidate in
the registry, the broker opens (a regular file as an AUTOCLEAR loop device, a block device with
its major:minor and diskseq verified), and its answer is checked against the candidate. A block
path (symlinks allowed: /dev/VG/LV, /dev/mapper/NAME, /dev/disk/by-*) is then checked to name the
device held, by sysfs (policyd.exports.identity: dm name and uuid, kernel name, partition, disk).
Every fresh fd has exactly one owner at any time: the caller's ExitStack until the operation
succeeds, then the registry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from policyd import errors
from policyd.brokerclient import Identity
from policyd.exports import identity
from policyd.exports.brokercalls import BrokerCalls
from policyd.exports.identity import NO_NAMES, DeviceNames
from policyd.exports.registry import Backing, BackingKey, Registry, block_key, file_key
from policyd.xenstore.store import PhysicalDevice

LOOP_MAJOR = 7
SECTOR_BYTES = 512  # sysfs's size unit, whatever the device's block size


class Sources:
    """Finds or opens the backing of a path or a caller's fd (through the broker)."""

    def __init__(self, registry: Registry, calls: BrokerCalls, sysfs_root: str = "/sys") -> None:
        self.registry = registry
        self.broker = calls.client
        self.call = calls
        self.sysfs_root = sysfs_root  # the real sysfs: it names the devices policyd holds

    async def open_path(
        self,
        path: str,
        writable: bool,
        direct_io: bool,
        undo: contextlib.ExitStack,
        dm_uuid: str = "",
        pinned: tuple[int, int] | None = None,
    ) -> Backing:
        """The backing to use for `path`: a shared held one, or a fresh one from the broker.

        policyd never opens the path itself: an lstat (which may be denied) finds a sharing
        candidate, and the broker's answer (backing dev/inode, or major:minor and diskseq) is
        checked against it; a block device is checked to be the one the path names (and to
        have the dm uuid `dm_uuid`, if given) and, if `pinned`, to be that major:minor (the
        device the export policy judged: identity.policy_path). A fresh fd is closed by `undo`
        unless the caller keeps it.
        """
        st: os.stat_result | None
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(path)  # a block device's symlink (udev's, LVM's) is followed
                if not stat.S_ISBLK(st.st_mode):
                    raise errors.Refused(
                        f"{path} is a symlink; symlinks are not followed: pass the target"
                    )
        except (FileNotFoundError, PermissionError):
            # Not visible to policyd (permissions, or its sandbox's private /tmp or read-only
            # /home view): the broker, which sees the real file system, decides.
            st = None
        except OSError as e:
            raise errors.InvalidArgument(f"{path}: {e.strerror}") from None
        if pinned is not None:
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if st is not None else None
            if st is None or not stat.S_ISBLK(st.st_mode) or dev != pinned:
                raise errors.DeviceChanged(
                    f"{path} led to block device {pinned[0]}:{pinned[1]} when the export "
                    "policy judged it, and no longer does; retry"
                )
        if st is None:
            return await self.open_unseen(path, writable, direct_io, undo, dm_uuid)
        if stat.S_ISBLK(st.st_mode):
            return await self.open_block_path(path, st, writable, undo, dm_uuid)
        if not stat.S_ISREG(st.st_mode):
            raise errors.InvalidArgument(f"{path} is neither a regular file nor a block device")
        no_uuid_for_files(path, dm_uuid)
        key = file_key(st.st_dev, st.st_ino)
        shared = self.registry.shareable(key, writable)
        if shared is not None:
            return shared
        fd, ident = await self.call(
            path,
            lambda: self.broker.loop_file(path, writable=writable, direct_io=direct_io),
        )
        if file_key(ident.backing_dev, ident.backing_ino) != key:
            os.close(fd)
            raise errors.DeviceChanged(f"{path} was replaced while it was being opened; retry")
        return self.fresh_or_shared(key, fd, ident, "file", writable, undo)

    async def open_block_path(
        self,
        path: str,
        st: os.stat_result,
        writable: bool,
        undo: contextlib.ExitStack,
        dm_uuid: str,
    ) -> Backing:
        """A block device path policyd could stat: the broker opens it pinned to the
        major:minor and diskseq seen here (a device removed and recreated in between has
        another diskseq: DeviceChanged), then sysfs must say the path names the device held."""
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        shared = self.registry.shareable(block_key(*dev), writable)
        if shared is not None:
            ident = shared.identity
            identity.verify(path, ident.major, ident.minor, ident.diskseq, dm_uuid, self.sysfs_root)
            return shared
        seen = identity.read_names(*dev, sysfs_root=self.sysfs_root)
        fd, ident = await self.call(
            path,
            lambda: self.broker.open_block(
                path, writable=writable, expect_dev=dev, expect_diskseq=seen.disk_diskseq
            ),
        )
        return await self.fresh_block(fd, ident, writable, undo, path, dm_uuid)

    async def open_unseen(
        self,
        path: str,
        writable: bool,
        direct_io: bool,
        undo: contextlib.ExitStack,
        dm_uuid: str = "",
    ) -> Backing:
        """A path policyd may not stat: try it as a file, then as a block device."""
        try:
            fd, ident = await self.call(
                path,
                lambda: self.broker.loop_file(path, writable=writable, direct_io=direct_io),
            )
        except errors.InvalidArgument:
            fd, ident = await self.call(
                path, lambda: self.broker.open_block(path, writable=writable)
            )
            return await self.fresh_block(fd, ident, writable, undo, path, dm_uuid)
        try:
            no_uuid_for_files(path, dm_uuid)
        except errors.PolicydError:
            os.close(fd)
            raise
        key = file_key(ident.backing_dev, ident.backing_ino)
        return self.fresh_or_shared(key, fd, ident, "file", writable, undo)

    async def fresh_block(
        self,
        fd: int,
        ident: Identity,
        writable: bool,
        undo: contextlib.ExitStack,
        path: str = "",
        dm_uuid: str = "",
    ) -> Backing:
        """A block device fresh from the broker, checked to be the one `path` names; for a
        loop device, also the file it is bound to (the broker's IDENTIFY), so a file is never
        written through one name while it is exported under another."""
        try:
            names = identity.verify(
                path, ident.major, ident.minor, ident.diskseq, dm_uuid, self.sysfs_root
            )
            alias = await self.loop_file_alias(fd, ident)
        except BaseException:
            os.close(fd)
            raise
        key = block_key(ident.major, ident.minor)
        return self.fresh_or_shared(key, fd, ident, "block", writable, undo, alias, names)

    async def loop_file_alias(self, fd: int, ident: Identity) -> BackingKey | None:
        if ident.major != LOOP_MAJOR:
            return None
        if not ident.backing_ino:
            ident = await self.call("the loop device", lambda: self.broker.identify(fd))
        return file_key(ident.backing_dev, ident.backing_ino) if ident.backing_ino else None

    def fresh_or_shared(
        self,
        key: BackingKey,
        fd: int,
        ident: Identity,
        kind: str,
        writable: bool,
        undo: contextlib.ExitStack,
        alias: BackingKey | None = None,
        names: DeviceNames = NO_NAMES,
    ) -> Backing:
        """Takes ownership of the fresh `fd`: closed at once if an existing backing is shared
        (or the sharing rules refuse), else by `undo` unless the operation succeeds."""
        try:
            shared = self.registry.shareable(key, writable)
            if shared is None and alias is not None:
                # the same file under another loop device: Busy unless both are read-only
                self.registry.shareable(alias, writable)
        except BaseException:
            os.close(fd)
            raise
        if shared is not None:
            os.close(fd)
            return shared
        undo.callback(os.close, fd)
        if kind == "file":
            alias = block_key(ident.major, ident.minor)
        aliases = () if alias is None else (alias,)
        return self.registry.new_backing(
            key, fd, ident, kind, writable, aliases, device_path(ident, self.sysfs_root), names
        )

    async def adopt_fd(self, fd: int, writable: bool, dm_uuid: str = "") -> Backing:
        """A caller-supplied fd, re-verified by the broker (and, with `dm_uuid`, by its sysfs
        dm uuid). The caller owns (and closes) fd unless the returned backing holds it."""
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise errors.InvalidArgument(
                "the fd is not a block device; pass an open block device, or a path to Export"
            )
        if writable and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise errors.InvalidArgument(
                "a read-write export needs an fd opened O_RDWR; set read-only or reopen"
            )
        ident = await self.call("the fd", lambda: self.broker.identify(fd))
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if (ident.major, ident.minor) != dev:
            raise errors.DeviceChanged(
                f"the broker identifies the fd as {ident.major}:{ident.minor}, not {dev}"
            )
        names = identity.verify("", *dev, ident.diskseq, dm_uuid, self.sysfs_root)
        shared = self.registry.shareable(block_key(*dev), writable)
        if shared is not None:
            return shared
        alias = file_key(ident.backing_dev, ident.backing_ino) if ident.backing_ino else None
        if alias is not None:
            self.registry.shareable(alias, writable)  # Busy on a read-write conflict
        aliases = () if alias is None else (alias,)
        return self.registry.new_backing(
            block_key(*dev),
            fd,
            ident,
            "block",
            writable,
            aliases,
            device_path(ident, self.sysfs_root),
            names,
        )

    # -- what an authentication prompt shows, before anything is opened ------------------------

    def preview_path(self, path: str) -> int | None:
        """The size of `path` as policyd sees it now (a file's length; a block device's, from
        sysfs); None if policyd cannot see it (its sandbox) or it is neither. For the prompt
        only: what the broker opens afterwards is what gets exported."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return self.block_size(os.major(st.st_rdev), os.minor(st.st_rdev))
        return None

    def preview_fd(self, fd: int) -> tuple[str, int | None]:
        """The device node's name and size of a caller's fd (a block device, else
        InvalidArgument as ExportFd would say), from policyd's own fstat and sysfs."""
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise errors.InvalidArgument(
                "the fd is not a block device; pass an open block device, or a path to Export"
            )
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        node = device_path(Identity(major, minor, 0, 0, 0, 0), self.sysfs_root)
        return node, self.block_size(major, minor)

    def block_size(self, major: int, minor: int) -> int | None:
        """A block device's size in bytes from sysfs (512-byte sectors); None if unknown."""
        try:
            with open(f"{self.sysfs_root}/dev/block/{major}:{minor}/size", "rb") as f:
                return int(f.read(32)) * SECTOR_BYTES
        except (OSError, ValueError):
            return None


def no_uuid_for_files(path: str, dm_uuid: str) -> None:
    if dm_uuid:
        raise errors.InvalidArgument(
            f"{path} is a file; the dm-uuid option applies to device-mapper block devices only"
        )


def physical(backing: Backing) -> PhysicalDevice:
    ident = backing.identity
    return PhysicalDevice(ident.major, ident.minor, backing.device_path, ident.diskseq)


def device_path(ident: Identity, sysfs_root: str = "/sys") -> str:
    """The device node's path as the kernel names the device: sysfs's dev/block/MAJ:MIN links
    to it (for a loop device /dev/loopN; N is not the minor once the loop driver's max_part is
    above 0). /dev/block/MAJ:MIN if sysfs does not know it."""
    try:
        target = os.readlink(f"{sysfs_root}/dev/block/{ident.major}:{ident.minor}")
        return "/dev/" + os.path.basename(target)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    return f"/dev/block/{ident.major}:{ident.minor}"
