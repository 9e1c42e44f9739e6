"""Change notification for the policy directory: inotify, through libc.

Trust level: unprivileged policyd code; the watched files are trusted (root-owned). This is only
a shortcut: `PolicyWatcher` asks `quiet()` before stat'ing every policy file on each request.
When inotify is unavailable, or any watch could not be added, or the event queue overflowed,
`quiet()` answers False and the caller does the full check, exactly as without this module.

The directory's watch reports changes to the files in it; each file gets a watch of its own too,
because a policy file may be a symlink to a file elsewhere (inotify follows it to the target).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

# <sys/inotify.h>
_EVENTS = (
    0x002  # IN_MODIFY
    | 0x004  # IN_ATTRIB
    | 0x008  # IN_CLOSE_WRITE
    | 0x040  # IN_MOVED_FROM
    | 0x080  # IN_MOVED_TO
    | 0x100  # IN_CREATE
    | 0x200  # IN_DELETE
    | 0x400  # IN_DELETE_SELF
    | 0x800  # IN_MOVE_SELF
)
_READ_SIZE = 65536


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


class ChangeFeed:
    """An inotify instance watching a fixed set of paths; `watch()` replaces the set."""

    def __init__(self) -> None:
        self._fd = -1
        self._complete = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._complete = -1, False

    def watch(self, paths: Iterable[Path]) -> None:
        """Watch these paths from now on (a fresh instance: no stale watches, no old events).
        Call it *before* reading what the paths hold, so a change during the read is seen."""
        self.close()
        if _LIBC is None:
            return
        fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        self._fd = fd
        self._complete = all(
            _LIBC.inotify_add_watch(fd, os.fsencode(path), _EVENTS) >= 0 for path in paths
        )

    def quiet(self) -> bool:
        """True only if every path is watched and nothing happened since `watch()`. Events are
        queued by the syscall that made the change, so a change made before this call is seen."""
        if not self._complete:
            return False
        try:
            os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            pass
        self._complete = False  # something happened (or the queue overflowed): check fully
        return False
