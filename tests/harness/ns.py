"""Mount namespace and parent-death helpers (ctypes; Python 3.11 has no os.unshare).

Test harness, runs as root. Used in child processes between fork and exec (preexec_fn) to give
a daemon its own view of a few fixed paths (/run/xenstored, polkit's rules and actions), and by
scripts/devstack to give the command it runs the same view of /run/xenstored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

# <linux/sched.h>, <linux/mount.h>
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_private_mount_namespace() -> None:
    """Unshare the mount namespace and stop mount events from propagating back to the host."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def bind_mount(source: Path, target: Path) -> None:
    """Bind `source` over `target` (both must exist) in the current mount namespace."""
    _check(
        _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None),
        f"mount --bind {source} {target}",
    )


def mount_fs(fstype: str, target: Path, options: str = "") -> None:
    """Mount a fresh `fstype` (tmpfs, cgroup2) on `target` in the current mount namespace."""
    _check(
        _libc.mount(
            fstype.encode(), os.fsencode(target), fstype.encode(), 0, options.encode() or None
        ),
        f"mount -t {fstype} {target}",
    )


def private_binds(binds: list[tuple[Path, Path]]) -> None:
    """preexec_fn body: a private mount namespace with `binds` (source, target) applied."""
    enter_private_mount_namespace()
    for source, target in binds:
        bind_mount(source, target)


def die_with_parent(signum: int) -> None:
    """preexec_fn body: get `signum` when the spawning thread exits, so a SIGKILLed harness does
    not leave daemons behind. The kernel clears this when the process changes its credentials
    later (dbus-daemon and polkitd drop privileges themselves, so they keep running then)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum), "prctl(PR_SET_PDEATHSIG)")
