"""The broker's sandbox: rlimits, no capabilities, no_new_privs, Landlock, a seccomp allowlist.

TRUST LEVEL: runs as root once, after every import and all start-up opens, before the first
request. After enter() the process can only do what ALLOWED_SYSCALLS lists (default: kill the
whole process), holds no capability, and cannot fork, exec or gain privileges. Landlock bounds
every later open by path, whatever the syscall (openat2's flags are out of seccomp's reach): read
and write files below the file roots and /dev, read them below /sys/devices; nothing may be
created, removed, renamed, linked or truncated anywhere. docs/broker.md explains every entry.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat
from collections.abc import Iterable

import prctl
import pyseccomp as seccomp

from broker import kernel

# Every syscall the serve loop makes, with why it needs it (docs/broker.md has the long form).
ALLOWED_SYSCALLS = (
    "read", "write",  # sysfs reads (partition check); log lines to stderr
    "close",  # every fd it opens or receives
    "openat2",  # LOOP_FILE: resolve below a root, O_PATH, no symlinks
    "newfstatat",  # fstat (glibc 2.33+): type and identity checks; os.path helpers
    "readlink",  # realpath of /sys/dev/block/M:m (partition check)
    "flock",  # the /dev/loop-control lock around allocation
    "poll",  # serve loop: listener + connection
    "restart_syscall",  # the kernel resumes an interrupted poll/sleep with it (SIGSTOP+SIGCONT)
    "accept4", "getsockname",  # a new connection (CPython wraps it in a socket object)
    "getsockopt",  # SO_PEERCRED of that connection
    "recvmsg", "sendmsg",  # requests and replies (with their fds)
    "clock_nanosleep", "clock_gettime",  # jitter between loop allocation retries
    "getpid",  # logging
    "brk", "mmap", "munmap", "mremap", "madvise",  # the allocator
    "futex",  # CPython's internal locks
    "rt_sigreturn",  # return from the SIGINT handler
    "exit", "exit_group",  # main() ends with os._exit: no interpreter teardown under the filter
)  # fmt: skip

# openat without these flags: the broker opens, but never creates, truncates or makes tmpfiles.
O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY  # O_TMPFILE includes O_DIRECTORY
OPEN_FORBIDDEN_FLAGS = os.O_CREAT | os.O_TRUNC | O_TMPFILE_BIT


def build_filter() -> seccomp.SyscallFilter:
    f = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
    for name in ALLOWED_SYSCALLS:
        f.add_rule(seccomp.ALLOW, name)
    # os.open, /proc/self/fd reopen, /dev/loopN and sysfs reads: never creating anything.
    f.add_rule(seccomp.ALLOW, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, OPEN_FORBIDDEN_FLAGS, 0))
    for flag in (os.O_CREAT, os.O_TRUNC, O_TMPFILE_BIT):
        with_flag = seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag)
        f.add_rule(seccomp.ERRNO(errno.EACCES), "openat", with_flag)
    # ioctl only for the request numbers kernel.IOCTLS_USED names (cmd is an unsigned int).
    for request in kernel.IOCTLS_USED:
        f.add_rule(seccomp.ALLOW, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    return f


def drop_capabilities() -> None:
    """Empty bounding, inheritable, permitted and effective sets (ambient follows). uid 0 could
    only regain capabilities through execve, which the filter kills."""
    for cap in range(64):
        try:
            prctl.capbset_drop(cap)
        except (OSError, ValueError):
            break  # beyond the kernel's last capability
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()


def set_rlimits() -> None:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork (uid 0 is exempt; seccomp is not)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dumps of a root process
    if not stat.S_ISREG(os.fstat(2).st_mode):
        # FSIZE=0 would turn every log line into SIGXFSZ when stderr is a file.
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 if it has none (ENOSYS) or it is off (EOPNOTSUPP)."""
    try:
        flags = kernel.LANDLOCK_CREATE_RULESET_VERSION
        return kernel.syscall(kernel.SYS_landlock_create_ruleset, None, 0, flags)
    except OSError:
        return 0


def landlock_rules(file_roots: Iterable[str]) -> list[tuple[str, int]]:
    """(directory, access allowed beneath it): image files (LOOP_FILE, r or rw); /dev for the
    device nodes, which appear and go (loopN), so no rule per node; sysfs `dev` files."""
    rw = kernel.LANDLOCK_ACCESS_FS_READ_FILE | kernel.LANDLOCK_ACCESS_FS_WRITE_FILE
    dev, sysfs = rw | kernel.LANDLOCK_ACCESS_FS_IOCTL_DEV, kernel.LANDLOCK_ACCESS_FS_READ_FILE
    return [*((root, rw) for root in file_roots), ("/dev", dev), ("/sys/devices", sysfs)]


def restrict_files(rules: Iterable[tuple[str, int]], abi: int) -> None:
    """Landlock: every access right this ABI knows is handled, so whatever no rule allows (create,
    remove, rename/link (REFER), truncate, execute, read a directory...) fails with EACCES/EXDEV.
    Needs no_new_privs (or CAP_SYS_ADMIN); the calls happen before the seccomp filter exists."""
    fs_rights = kernel.LANDLOCK_FS_RIGHTS[min(abi, len(kernel.LANDLOCK_FS_RIGHTS) - 1)]
    attr = kernel.landlock_ruleset_attr((1 << fs_rights) - 1)
    size = ctypes.sizeof(attr)
    ruleset = kernel.syscall(kernel.SYS_landlock_create_ruleset, ctypes.byref(attr), size, 0)
    try:
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            rule = kernel.landlock_path_beneath_attr(access & attr.handled_access_fs, fd)
            try:
                kind, rule_ref = kernel.LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule)
                kernel.syscall(kernel.SYS_landlock_add_rule, ruleset, kind, rule_ref, 0)
            finally:
                os.close(fd)
        kernel.syscall(kernel.SYS_landlock_restrict_self, ruleset, 0)
    finally:
        os.close(ruleset)


def enter(file_roots: Iterable[str], landlock: int) -> None:
    """The sandbox, in order; Landlock (ABI version `landlock`, 0: none) after no_new_privs."""
    set_rlimits()
    drop_capabilities()
    prctl.set_no_new_privs(1)
    if landlock:
        restrict_files(landlock_rules(file_roots), landlock)
    build_filter().load()
