"""The broker's sandbox: rlimits, no capabilities, no_new_privs, Landlock, a seccomp allowlist.

TRUST LEVEL: runs as root once, after every import and all start-up opens, before the first
request. After enter() the process can only do what ALLOWED_SYSCALLS lists (default: kill the
whole process), holds no capability, and cannot fork, exec or gain privileges. Landlock bounds
every later open by path, whatever the syscall (openat2's flags are out of seccomp's reach): read
and write files below the file roots and /dev, read them below /sys/devices; nothing may be
created, removed, renamed, linked or truncated anywhere. docs/broker.md explains every entry.
"""

import ctypes
import errno
import os
import resource
import stat

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
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # a Landlock rule's directory


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
    for capset in (prctl.cap_inheritable, prctl.cap_effective, prctl.cap_permitted):
        capset.limit()  # no argument: keep none


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


def restrict_files(file_roots: tuple[str, ...], abi: int) -> None:
    """Landlock, ABI version `abi`. Allowed: read and write files below the roots (LOOP_FILE, r
    or rw) and /dev (device nodes appear and go, loopN: no rule per node); read sysfs `dev`
    files. Every right the ABI knows is handled, so all else (create, remove, rename or link
    (REFER), truncate, execute, list a directory...) fails with EACCES or EXDEV. Needs
    no_new_privs; runs before the seccomp filter exists, which therefore allows none of it."""
    read, write = kernel.LANDLOCK_ACCESS_FS_READ_FILE, kernel.LANDLOCK_ACCESS_FS_WRITE_FILE
    dev = ("/dev", read | write | kernel.LANDLOCK_ACCESS_FS_IOCTL_DEV)
    rules = [*((root, read | write) for root in file_roots), dev, ("/sys/devices", read)]
    handled = (1 << kernel.LANDLOCK_FS_RIGHTS[min(abi, len(kernel.LANDLOCK_FS_RIGHTS) - 1)]) - 1
    attr, kind = kernel.landlock_ruleset_attr(handled), kernel.LANDLOCK_RULE_PATH_BENEATH
    size = ctypes.sizeof(attr)
    # No cleanup on failure: any error here ends start-up (status 2).
    ruleset = kernel.syscall(kernel.SYS_landlock_create_ruleset, ctypes.byref(attr), size, 0)
    for path, access in rules:  # a right not handled would be EINVAL (IOCTL_DEV before ABI 5)
        rule = kernel.landlock_path_beneath_attr(access & handled, os.open(path, DIR_PATH))
        kernel.syscall(kernel.SYS_landlock_add_rule, ruleset, kind, ctypes.byref(rule), 0)
        os.close(rule.parent_fd)
    kernel.syscall(kernel.SYS_landlock_restrict_self, ruleset, 0)
    os.close(ruleset)


def enter(file_roots: tuple[str, ...], landlock: int) -> None:
    """The sandbox, in order; Landlock (ABI version `landlock`, 0: none) after no_new_privs."""
    set_rlimits()
    drop_capabilities()
    prctl.set_no_new_privs(1)
    if landlock:
        restrict_files(file_roots, landlock)
    build_filter().load()
