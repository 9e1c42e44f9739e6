"""systemd's file descriptor store, client side: take the fds systemd passed at start, push and
remove named fds, send READY=1/STATUS= notifications. Standard library only.

TRUST LEVEL: unprivileged (runs inside policyd as user blockbroker). The environment it parses
(LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, NOTIFY_SOCKET) comes from the service manager, which is
trusted; it is still parsed strictly, so a stray or malformed value (a wrapper that forked, a
hand-set variable) yields no fds and a named error instead of adopting arbitrary fd numbers.

Protocol (sd_listen_fds(3), sd_notify(3), systemd 252):
- On start the main process gets LISTEN_FDS=n fds at 3..3+n-1, LISTEN_PID=its pid and
  LISTEN_FDNAMES=name:name:... (one per fd; stored fds carry the FDNAME they were pushed with).
- "FDSTORE=1\\nFDNAME=<name>" with the fd in SCM_RIGHTS stores it; "FDSTOREREMOVE=1\\nFDNAME=<name>"
  closes every stored fd with that name. systemd keeps fds across a crash with Restart= and
  across `systemctl restart`, and drops them on a full stop.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import MutableMapping

LISTEN_FDS_START = 3
FDNAME_MAX = 255
UNKNOWN_NAME = "unknown"  # sd_listen_fds_with_names' name for an fd LISTEN_FDNAMES leaves out
# sd_notify's datagrams are at most PIPE_BUF bytes in systemd 252 (NOTIFY_BUFFER_MAX = PIPE_BUF)
NOTIFY_MAX = 4096
# keep well below RLIMIT_NOFILE's hard ceilings; a larger LISTEN_FDS is a malformed environment
LISTEN_FDS_MAX = 1 << 20
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ListenFdsError(ValueError):
    """LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are set but malformed; the message says which."""


class NotifySocketError(ValueError):
    """NOTIFY_SOCKET is set but is neither an absolute path nor an abstract '@name'."""


def valid_fdname(name: str) -> bool:
    """systemd's fdname_is_valid: 0..255 characters, each 0x20-0x7E except ':'."""
    return len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def _decimal(untrusted_value: str, what: str) -> int:
    # int() would accept "+3", " 3", "3_0" and non-ASCII digits; systemd's safe_atoi does not.
    if not untrusted_value.isascii() or not untrusted_value.isdigit():
        raise ListenFdsError(f"{what}={untrusted_value!r} is not a decimal number")
    if len(untrusted_value) > 1 and untrusted_value[0] == "0":
        raise ListenFdsError(f"{what}={untrusted_value!r} has a leading zero")
    return int(untrusted_value)


def _parse_listen_fds(environ: MutableMapping[str, str]) -> list[tuple[int, str]]:
    untrusted_pid = environ.get("LISTEN_PID")
    untrusted_count = environ.get("LISTEN_FDS")
    untrusted_names = environ.get("LISTEN_FDNAMES")
    if untrusted_pid is None and untrusted_count is None:
        if untrusted_names is not None:
            raise ListenFdsError("LISTEN_FDNAMES is set without LISTEN_PID and LISTEN_FDS")
        return []
    if untrusted_pid is None or untrusted_count is None:
        raise ListenFdsError("only one of LISTEN_PID and LISTEN_FDS is set")
    pid = _decimal(untrusted_pid, "LISTEN_PID")
    if pid != os.getpid():
        # Not an error in sd_listen_fds: the fds were meant for another process (a parent
        # that exec'd us after forking). They are not ours to take.
        return []
    count = _decimal(untrusted_count, "LISTEN_FDS")
    if count > LISTEN_FDS_MAX:
        raise ListenFdsError(f"LISTEN_FDS={count} is more than {LISTEN_FDS_MAX}")
    names = [UNKNOWN_NAME] * count
    if untrusted_names is not None and (count > 0 or untrusted_names != ""):
        given = untrusted_names.split(":")
        if len(given) > count:
            raise ListenFdsError(f"LISTEN_FDNAMES has {len(given)} names for {count} fds")
        for i, untrusted_name in enumerate(given):
            if not valid_fdname(untrusted_name):
                raise ListenFdsError(f"LISTEN_FDNAMES entry {i} ({untrusted_name!r}) is invalid")
            names[i] = untrusted_name
    fds = [(LISTEN_FDS_START + i, names[i]) for i in range(count)]
    for fd, _name in fds:
        try:
            os.fstat(fd)
        except OSError as e:
            raise ListenFdsError(f"LISTEN_FDS={count} but fd {fd} is not open: {e}") from e
    return fds


def take_listen_fds(environ: MutableMapping[str, str] = os.environ) -> list[tuple[int, str]]:
    """The fds the service manager passed, as (fd, name), with FD_CLOEXEC set on each.

    The three LISTEN_* variables are removed from `environ` (default os.environ) in every case,
    so no child inherits them. LISTEN_PID naming another process gives []. Malformed values
    raise ListenFdsError and no fd is taken: the caller decides whether to go on without them
    (their numbers are then unknown, so it cannot safely close anything)."""
    try:
        fds = _parse_listen_fds(environ)
    finally:
        for var in _LISTEN_VARS:
            environ.pop(var, None)
    for fd, _name in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds


def _notify_address(untrusted_value: str) -> str | bytes:
    if untrusted_value.startswith("@") and len(untrusted_value) > 1:
        return b"\0" + os.fsencode(untrusted_value[1:])
    if untrusted_value.startswith("/"):
        return untrusted_value
    raise NotifySocketError(
        f"NOTIFY_SOCKET={untrusted_value!r} is neither an absolute path nor '@abstract'"
    )


class FdStore:
    """The service manager's notify socket: fd store and readiness messages.

    `available` is False without NOTIFY_SOCKET (not run by systemd, or the unit has neither
    Type=notify nor FileDescriptorStoreMax>0); then every send is a no-op, as sd_notify's is.
    Sends are blocking datagrams; a failure raises OSError and the caller decides."""

    def __init__(self, notify_socket: str | None = None) -> None:
        value = os.environ.get("NOTIFY_SOCKET") if notify_socket is None else notify_socket
        self._address = None if not value else _notify_address(value)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> FdStore:
        """From NOTIFY_SOCKET in `environ` (default os.environ); it stays set, as systemd's
        clients leave it for the main process's later notifications."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET", ""))

    @property
    def available(self) -> bool:
        return self._address is not None

    def push(self, fd: int, name: str) -> None:
        """Store `fd` (a duplicate is kept by systemd; the caller keeps its own) as `name`."""
        if not valid_fdname(name):
            raise ValueError(f"invalid fd store name {name!r}")
        self._send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> None:
        """Close every stored fd named `name`."""
        if not valid_fdname(name):
            raise ValueError(f"invalid fd store name {name!r}")
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def notify(self, text: str) -> None:
        """A plain notification such as "READY=1" or "STATUS=…" (newline-separated lines)."""
        if "\0" in text:
            raise ValueError("a notification cannot contain NUL")
        self._send(text, [])

    def _send(self, text: str, fds: list[int]) -> None:
        if self._address is None:
            return
        data = text.encode()
        if len(data) > NOTIFY_MAX:
            raise ValueError(f"notification of {len(data)} bytes is over {NOTIFY_MAX}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # socket.send_fds() ignores its address argument before Python 3.12: sendmsg it is
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sock.sendmsg([data], ancillary if fds else [], 0, self._address)
