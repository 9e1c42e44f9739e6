"""The broker's three operations: open a block device, bind a file to a loop device, identify an fd.

TRUST LEVEL: runs as root under seccomp; all input untrusted. Every path and number here comes
from policyd and is checked against the root-owned config before anything is opened. Files and
devices are first opened with O_PATH (no side effects, even for FIFOs or tape devices), checked
with fstat, and only then reopened for I/O through /proc/self/fd, so what is checked is what is
opened. Ownership of a new fd passes to the caller only on success (ExitStack.pop_all).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import stat
import struct
import time
from dataclasses import dataclass

from broker import kernel
from broker.config import Config, block_device_of
from broker.protocol import ErrorCode, Reply, ReplyKind

LOOP_ATTEMPTS = 8
LOOP_RETRYABLE = (errno.EBUSY, errno.ENXIO)  # another allocator won the race for this device
VALID_BLOCK_SIZES = (0, 512, 1024, 2048, 4096)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class OpError(Exception):
    def __init__(self, code: ErrorCode, message: str, err: int | None = 0) -> None:
        super().__init__(message)
        self.code = code
        self.errno = err or 0
        self.message = message


@dataclass(frozen=True)
class Opened:
    fd: int
    reply: Reply


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


def ioctl_u64(fd: int, request: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, request, buf)
    return int(struct.unpack("=Q", buf)[0])


def reopen(path_fd: int, writable: bool) -> int:
    """Open the inode behind an O_PATH fd for I/O: what fstat checked is what gets opened."""
    access = os.O_RDWR if writable else os.O_RDONLY
    try:
        return os.open(f"/proc/self/fd/{path_fd}", access | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise OpError(ErrorCode.OPEN_FAILED, f"open: {e.strerror}", e.errno) from None


def block_identity(fd: int, st: os.stat_result) -> Reply:
    try:
        diskseq = ioctl_u64(fd, kernel.BLKGETDISKSEQ)
        size = ioctl_u64(fd, kernel.BLKGETSIZE64)
    except OSError as e:
        raise OpError(ErrorCode.OPEN_FAILED, f"block ioctl: {e.strerror}", e.errno) from None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return Reply(ReplyKind.OK, major=major, minor=minor, diskseq=diskseq, size=size)


def loop_status(fd: int) -> kernel.loop_info64:
    info = kernel.loop_info64()
    fcntl.ioctl(fd, kernel.LOOP_GET_STATUS64, info)
    return info


class Operations:
    """Holds what start-up prepared (config, root dirfds, /dev/loop-control) for the requests."""

    def __init__(self, config: Config, forbidden_devices: frozenset[int]) -> None:
        self.config = config
        self.forbidden = forbidden_devices
        self.root_fds = {
            root: os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            for root in config.file_roots
        }
        self.loop_control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)

    # -- OPEN_BLOCK -------------------------------------------------------------------------

    def on_root_disk(self, rdev: int) -> bool:
        if rdev in self.forbidden:
            return True
        sysdir = block_device_of(rdev)  # a partition created after start-up: check its disk
        if sysdir is None or not os.path.exists(os.path.join(sysdir, "partition")):
            return False
        fd = os.open(os.path.join(os.path.dirname(sysdir), "dev"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            major, minor = os.read(fd, 64).decode().strip().split(":")
        finally:
            os.close(fd)
        return os.makedev(int(major), int(minor)) in self.forbidden

    def open_block(
        self,
        untrusted_path: bytes,
        writable: bool,
        expect_dev: tuple[int, int] | None,
        expect_diskseq: int | None,
    ) -> Opened:
        path = validate_path(untrusted_path)
        with contextlib.ExitStack() as stack:
            try:
                path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                raise OpError(ErrorCode.NOT_FOUND, "no such device node", errno.ENOENT) from None
            except OSError as e:
                raise OpError(ErrorCode.OPEN_FAILED, f"open: {e.strerror}", e.errno) from None
            stack.callback(os.close, path_fd)
            st = os.fstat(path_fd)
            if not stat.S_ISBLK(st.st_mode):
                raise OpError(ErrorCode.NOT_BLOCK_DEVICE, "not a block device")
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if dev[0] not in self.config.block_majors:
                raise OpError(ErrorCode.MAJOR_NOT_ALLOWED, f"major {dev[0]} is not allowed")
            if self.on_root_disk(st.st_rdev):
                raise OpError(ErrorCode.ROOT_DISK, "the root filesystem's disk is never opened")
            if expect_dev is not None and expect_dev != dev:
                raise OpError(ErrorCode.IDENTITY_MISMATCH, f"device is {dev[0]}:{dev[1]}")
            fd = reopen(path_fd, writable)
            stack.callback(os.close, fd)
            identity = block_identity(fd, os.fstat(fd))
            if (identity.major, identity.minor) != dev:
                raise OpError(ErrorCode.VERIFY_FAILED, "device changed while opening")
            if expect_diskseq is not None and expect_diskseq != identity.diskseq:
                raise OpError(ErrorCode.IDENTITY_MISMATCH, f"diskseq is {identity.diskseq}")
            stack.pop_all()
            os.close(path_fd)
            return Opened(fd, identity)
        raise AssertionError("unreachable")

    # -- LOOP_FILE --------------------------------------------------------------------------

    def open_below_root(self, path: str) -> int:
        """O_PATH fd of `path`, resolved beneath its configured root without any symlink."""
        for root, candidate_fd in self.root_fds.items():
            if path.startswith(root.rstrip("/") + "/"):
                relative = path[len(root.rstrip("/")) + 1 :]
                root_fd = candidate_fd
                break
        else:
            raise OpError(ErrorCode.OUTSIDE_ROOTS, "path is not below a configured root")
        how = kernel.open_how(
            flags=os.O_PATH | os.O_CLOEXEC,  # not O_NOFOLLOW: that would return the link itself
            resolve=kernel.RESOLVE_BENEATH
            | kernel.RESOLVE_NO_SYMLINKS
            | kernel.RESOLVE_NO_MAGICLINKS,
        )
        fd = _libc.syscall(
            kernel.SYS_openat2,
            ctypes.c_int(root_fd),
            ctypes.c_char_p(relative.encode()),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            raise OpError(ErrorCode.NOT_FOUND, "no such file", err)
        if err == errno.ELOOP:
            raise OpError(ErrorCode.SYMLINK, "path contains a symlink", err)
        if err == errno.EXDEV:
            raise OpError(ErrorCode.OUTSIDE_ROOTS, "path escapes its root", err)
        raise OpError(ErrorCode.OPEN_FAILED, f"open: {os.strerror(err)}", err)

    def loop_file(
        self, untrusted_path: bytes, writable: bool, direct_io: bool, block_size: int
    ) -> Opened:
        path = validate_path(untrusted_path)
        if block_size not in VALID_BLOCK_SIZES:
            raise OpError(ErrorCode.BAD_ARGUMENT, f"block size {block_size} is not supported")
        with contextlib.ExitStack() as stack:
            path_fd = self.open_below_root(path)
            stack.callback(os.close, path_fd)
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise OpError(ErrorCode.NOT_REGULAR_FILE, "not a regular file")
            backing_fd = reopen(path_fd, writable)
            stack.callback(os.close, backing_fd)
            flags = kernel.LO_FLAGS_AUTOCLEAR
            flags |= 0 if writable else kernel.LO_FLAGS_READ_ONLY
            flags |= kernel.LO_FLAGS_DIRECT_IO if direct_io else 0
            loop_fd = self.bind_free_loop(backing_fd, writable, flags, block_size, path)
            # From here on an error closes loop_fd, and AUTOCLEAR releases the device.
            stack.callback(os.close, loop_fd)
            loop_st = os.fstat(loop_fd)
            info = loop_status(loop_fd)
            if (info.lo_device, info.lo_inode) != (st.st_dev, st.st_ino):
                raise OpError(ErrorCode.VERIFY_FAILED, "the loop device is bound to another file")
            if info.lo_flags & flags != flags:  # the kernel drops flags it cannot honour
                raise OpError(
                    ErrorCode.VERIFY_FAILED, f"kernel set flags {info.lo_flags:#x}, not {flags:#x}"
                )
            identity = block_identity(loop_fd, loop_st)
            stack.pop_all()
            os.close(backing_fd)
            os.close(path_fd)
            reply = Reply(
                ReplyKind.OK,
                major=identity.major,
                minor=identity.minor,
                diskseq=identity.diskseq,
                size=identity.size,
                backing_dev=st.st_dev,
                backing_ino=st.st_ino,
            )
            return Opened(loop_fd, reply)
        raise AssertionError("unreachable")

    def bind_free_loop(
        self, backing_fd: int, writable: bool, flags: int, block_size: int, path: str
    ) -> int:
        """LOOP_CTL_GET_FREE + open + LOOP_CONFIGURE under the loop-control lock, retried a
        bounded number of times on EBUSY/ENXIO (someone who does not take the lock, e.g. an
        old losetup, bound or removed the device in between). Never LOOP_SET_FD."""
        config = kernel.loop_config(fd=backing_fd, block_size=block_size)
        config.info.lo_flags = flags
        name = path.encode()[: kernel.LO_NAME_SIZE - 1]
        ctypes.memmove(config.info.lo_file_name, name, len(name))
        access = os.O_RDWR if writable else os.O_RDONLY
        fcntl.flock(self.loop_control, fcntl.LOCK_EX)
        try:
            for attempt in range(LOOP_ATTEMPTS):
                try:
                    number = fcntl.ioctl(self.loop_control, kernel.LOOP_CTL_GET_FREE)
                    loop_fd = os.open(f"/dev/loop{number}", access | os.O_CLOEXEC | os.O_NOCTTY)
                except OSError as e:
                    if e.errno not in LOOP_RETRYABLE:
                        raise OpError(
                            ErrorCode.LOOP_FAILED, f"loop: {e.strerror}", e.errno
                        ) from None
                    time.sleep(random.uniform(0, 0.001 * 2**attempt))
                    continue
                try:
                    fcntl.ioctl(loop_fd, kernel.LOOP_CONFIGURE, bytes(config))
                    return loop_fd
                except OSError as e:
                    os.close(loop_fd)
                    if e.errno not in LOOP_RETRYABLE:
                        raise OpError(
                            ErrorCode.LOOP_FAILED, f"LOOP_CONFIGURE: {e.strerror}", e.errno
                        ) from None
                time.sleep(random.uniform(0, 0.001 * 2**attempt))
            raise OpError(ErrorCode.LOOP_BUSY, "no free loop device after retries", errno.EBUSY)
        finally:
            fcntl.flock(self.loop_control, fcntl.LOCK_UN)

    # -- IDENTIFY ---------------------------------------------------------------------------

    def identify(self, fd: int) -> Reply:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise OpError(ErrorCode.NOT_BLOCK_DEVICE, "not a block device")
        identity = block_identity(fd, st)
        if identity.major != kernel.LOOP_MAJOR:
            return identity
        try:
            info = loop_status(fd)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: an unbound loop device has no backing file
                raise OpError(
                    ErrorCode.OPEN_FAILED, f"loop status: {e.strerror}", e.errno
                ) from None
            return identity
        return Reply(
            ReplyKind.OK,
            major=identity.major,
            minor=identity.minor,
            diskseq=identity.diskseq,
            size=identity.size,
            backing_dev=info.lo_device,
            backing_ino=info.lo_inode,
        )
