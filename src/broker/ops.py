"""The broker's three operations: open a block device, bind a file to a loop device, identify an fd.

TRUST LEVEL: runs as root under seccomp; all input untrusted. Every path and number here comes
from policyd and is checked against the root-owned config before anything is opened. Files and
devices are first opened with O_PATH (no side effects, even for FIFOs or tape devices), checked
with fstat, and only then reopened for I/O through /proc/self/fd, so what is checked is what is
opened. Ownership of a new fd passes to the caller only on success (ExitStack.pop_all).
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import stat
import struct
import time
from dataclasses import dataclass, replace

from broker import kernel
from broker.config import Config, disk_of, read_dev
from broker.protocol import ErrorCode, Reply, ReplyKind, Request, RequestFlag

LOOP_ATTEMPTS = 16
LOOP_BACKOFF_MAX = 0.02  # seconds: cap of one jittered wait between attempts
LOOP_RETRYABLE = (errno.EBUSY, errno.ENXIO)  # another allocator won the race for this device
VALID_BLOCK_SIZES = (0, 512, 1024, 2048, 4096)
RESOLVE = kernel.RESOLVE_BENEATH | kernel.RESOLVE_NO_SYMLINKS | kernel.RESOLVE_NO_MAGICLINKS
ERRNO_CODES = {  # what a refused open means
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.ELOOP: ErrorCode.SYMLINK,  # RESOLVE_NO_SYMLINKS met a symlink
    errno.EXDEV: ErrorCode.OUTSIDE_ROOTS,  # RESOLVE_BENEATH: the path escapes its root
    errno.EBUSY: ErrorCode.IN_USE,  # O_EXCL on a block device dom0 uses: see open_block
}


class OpError(Exception):
    def __init__(self, code: ErrorCode, message: str, err: int | None = 0) -> None:
        super().__init__(message)
        self.code, self.errno, self.message = code, err or 0, message

    @classmethod
    def from_os(cls, e: OSError, what: str, code: ErrorCode = ErrorCode.OPEN_FAILED) -> "OpError":
        if code == ErrorCode.OPEN_FAILED:
            code = ERRNO_CODES.get(e.errno or 0, code)
        return cls(code, f"{what}: {e.strerror}", e.errno)


@dataclass(frozen=True)
class Result:
    fd: int | None  # the fd to pass with the reply; the caller closes it after sending
    reply: Reply
    retries: int = 0  # LOOP_FILE: allocation attempts lost to another allocator


def validate_path(untrusted_path: bytes) -> str:
    """An absolute, normalized UTF-8 path: no NUL, no empty, '.' or '..' component."""
    try:
        path = untrusted_path.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise OpError(ErrorCode.BAD_PATH, "path is not UTF-8") from None
    if "\0" in path or not path.startswith("/") or path == "/":
        raise OpError(ErrorCode.BAD_PATH, "path must be absolute and contain no NUL")
    if any(part in ("", ".", "..") for part in path[1:].split("/")):
        raise OpError(ErrorCode.BAD_PATH, "path has an empty, '.' or '..' component")
    return path


def ioctl_read(fd: int, request: int, fmt: str = "=Q") -> int:
    """The number an ioctl writes through its pointer argument: a u64, or as `fmt` says."""
    out = fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt)))
    return int(struct.unpack(fmt, out)[0])


def open_fd(path: str, flags: int) -> int:
    """os.open with O_CLOEXEC|O_NOCTTY; a refusal is an OpError (NOT_FOUND, OPEN_FAILED...)."""
    try:
        return os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise OpError.from_os(e, "open") from None


def reopen(path_fd: int, flags: int) -> int:
    """Open the inode behind an O_PATH fd: what fstat checked is what gets opened."""
    return open_fd(f"/proc/self/fd/{path_fd}", flags)


def block_identity(fd: int) -> Reply:
    rdev = os.fstat(fd).st_rdev
    try:
        diskseq, size = ioctl_read(fd, kernel.BLKGETDISKSEQ), ioctl_read(fd, kernel.BLKGETSIZE64)
    except OSError as e:
        raise OpError.from_os(e, "block device ioctl") from None
    major, minor = os.major(rdev), os.minor(rdev)
    return Reply(ReplyKind.OK, major=major, minor=minor, diskseq=diskseq, size=size)


def loop_status(fd: int) -> kernel.loop_info64:
    info = kernel.loop_info64()
    fcntl.ioctl(fd, kernel.LOOP_GET_STATUS64, info)
    return info


class Operations:
    """Holds what start-up prepared (config, root dirfds, /dev/loop-control) for the requests."""

    def __init__(self, config: Config, forbidden_devices: frozenset[int]) -> None:
        self.config, self.forbidden = config, forbidden_devices
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        self.root_fds = {root: os.open(root, flags) for root in config.file_roots}
        self.loop_control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)

    def on_root_disk(self, rdev: int) -> bool:
        """The root filesystem's disk, or a partition of it (even one made after start-up)."""
        disk = disk_of(rdev)
        return rdev in self.forbidden or bool(disk and read_dev(f"{disk}/dev") in self.forbidden)

    def open_block(self, request: Request, fds: list[int]) -> Result:
        path = validate_path(request.path)
        with contextlib.ExitStack() as always, contextlib.ExitStack() as on_error:
            path_fd = open_fd(path, os.O_PATH)
            always.callback(os.close, path_fd)
            st = os.fstat(path_fd)
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not stat.S_ISBLK(st.st_mode):
                raise OpError(ErrorCode.NOT_BLOCK_DEVICE, "not a block device")
            if dev[0] not in self.config.block_majors:
                raise OpError(ErrorCode.MAJOR_NOT_ALLOWED, f"major {dev[0]} is not allowed")
            if self.on_root_disk(st.st_rdev):
                raise OpError(ErrorCode.ROOT_DISK, "the root filesystem's disk is never opened")
            expected = (request.expect_major, request.expect_minor)
            if request.flags & RequestFlag.EXPECT_DEV and dev != expected:
                raise OpError(ErrorCode.IDENTITY_MISMATCH, f"device is {dev[0]}:{dev[1]}")
            writable = bool(request.flags & RequestFlag.WRITABLE)
            fd = reopen(path_fd, os.O_RDWR if writable else os.O_RDONLY)
            on_error.callback(os.close, fd)
            if writable and ioctl_read(fd, kernel.BLKROGET, "=i"):  # O_RDWR did not refuse it
                raise OpError(ErrorCode.OPEN_FAILED, "the device is read-only", errno.EROFS)
            # The kernel knows what dom0 itself uses: O_EXCL on a block device fails (EBUSY:
            # IN_USE) while it is mounted, active swap, a dm/md member, or a whole disk one of
            # whose partitions is claimed; whatever the root filesystem (btrfs and ZFS too).
            os.close(reopen(path_fd, os.O_RDONLY | os.O_EXCL))
            identity = block_identity(fd)
            if (identity.major, identity.minor) != dev:
                raise OpError(ErrorCode.VERIFY_FAILED, "device changed while opening")
            seq = identity.diskseq
            if request.flags & RequestFlag.EXPECT_DISKSEQ and request.expect_diskseq != seq:
                raise OpError(ErrorCode.IDENTITY_MISMATCH, f"diskseq is {identity.diskseq}")
            on_error.pop_all()
        return Result(fd, identity)

    def open_below_root(self, path: str) -> int:
        """O_PATH fd of `path`, resolved beneath its configured root without any symlink.
        Not O_NOFOLLOW: with O_PATH that would return a trailing symlink itself."""
        root = next((r for r in self.root_fds if path.startswith(r.rstrip("/") + "/")), None)
        if root is None:
            raise OpError(ErrorCode.OUTSIDE_ROOTS, "path is not below a configured root")
        relative = path[len(root.rstrip("/")) + 1 :].encode()
        how = kernel.open_how(flags=os.O_PATH | os.O_CLOEXEC, resolve=RESOLVE)
        dirfd, size = self.root_fds[root], ctypes.c_size_t(ctypes.sizeof(how))
        try:
            return kernel.syscall(kernel.SYS_openat2, dirfd, relative, ctypes.byref(how), size)
        except OSError as e:
            raise OpError.from_os(e, "open") from None

    def loop_file(self, request: Request, fds: list[int]) -> Result:
        path = validate_path(request.path)
        writable = bool(request.flags & RequestFlag.WRITABLE)
        if request.block_size not in VALID_BLOCK_SIZES:
            raise OpError(ErrorCode.BAD_ARGUMENT, f"block size {request.block_size} unsupported")
        flags = kernel.LO_FLAGS_AUTOCLEAR | (0 if writable else kernel.LO_FLAGS_READ_ONLY)
        flags |= kernel.LO_FLAGS_DIRECT_IO if request.flags & RequestFlag.DIRECT_IO else 0
        with contextlib.ExitStack() as always, contextlib.ExitStack() as on_error:
            path_fd = self.open_below_root(path)
            always.callback(os.close, path_fd)
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise OpError(ErrorCode.NOT_REGULAR_FILE, "not a regular file")
            backing_fd = reopen(path_fd, os.O_RDWR if writable else os.O_RDONLY)
            always.callback(os.close, backing_fd)
            config = kernel.loop_config(fd=backing_fd, block_size=request.block_size)
            config.info.lo_flags = flags
            name = path.encode()[: kernel.LO_NAME_SIZE - 1]
            ctypes.memmove(config.info.lo_file_name, name, len(name))
            loop_fd, retries = self.bind_free_loop(config, writable)
            on_error.callback(os.close, loop_fd)  # AUTOCLEAR releases the device
            info = loop_status(loop_fd)
            if (info.lo_device, info.lo_inode) != (st.st_dev, st.st_ino):
                raise OpError(ErrorCode.VERIFY_FAILED, "the loop device is bound to another file")
            read_only = bool(info.lo_flags & kernel.LO_FLAGS_READ_ONLY)
            if info.lo_flags & flags != flags or read_only == writable:  # kernels drop/add flags
                raise OpError(ErrorCode.VERIFY_FAILED, f"kernel set flags {info.lo_flags:#x}")
            identity = block_identity(loop_fd)
            on_error.pop_all()
        reply = replace(identity, backing_dev=st.st_dev, backing_ino=st.st_ino)
        return Result(loop_fd, reply, retries)

    def bind_free_loop(self, config: kernel.loop_config, writable: bool) -> tuple[int, int]:
        """LOOP_CTL_GET_FREE + open + LOOP_CONFIGURE under the loop-control lock, retried a
        bounded number of times on EBUSY/ENXIO (someone who does not take the lock, e.g. an
        old losetup, bound or removed the device in between). Never LOOP_SET_FD. The lock is
        released before each back-off (as systemd's loop-util does): other allocators go on."""
        access = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
        for attempt in range(LOOP_ATTEMPTS):
            fcntl.flock(self.loop_control, fcntl.LOCK_EX)
            loop_fd = -1
            try:
                number = fcntl.ioctl(self.loop_control, kernel.LOOP_CTL_GET_FREE)
                loop_fd = os.open(f"/dev/loop{number}", access)
                fcntl.ioctl(loop_fd, kernel.LOOP_CONFIGURE, bytes(config))
                return loop_fd, attempt
            except OSError as e:
                if loop_fd >= 0:
                    os.close(loop_fd)
                if e.errno not in LOOP_RETRYABLE:
                    raise OpError.from_os(e, "loop", ErrorCode.LOOP_FAILED) from None
            finally:
                fcntl.flock(self.loop_control, fcntl.LOCK_UN)
            time.sleep(random.uniform(0, min(0.001 * 2**attempt, LOOP_BACKOFF_MAX)))
        raise OpError(ErrorCode.LOOP_BUSY, "no free loop device after retries", errno.EBUSY)

    def identify(self, request: Request, fds: list[int]) -> Result:
        if not stat.S_ISBLK(os.fstat(fds[0]).st_mode):
            raise OpError(ErrorCode.NOT_BLOCK_DEVICE, "not a block device")
        identity = block_identity(fds[0])
        if identity.major == kernel.LOOP_MAJOR:
            try:
                info = loop_status(fds[0])
                identity = replace(identity, backing_dev=info.lo_device, backing_ino=info.lo_inode)
            except OSError as e:
                if e.errno != errno.ENXIO:  # an unbound loop device has no backing file
                    raise OpError.from_os(e, "loop status") from None
        return Result(None, identity)
