"""policyd's client for the privileged broker: one SOCK_SEQPACKET connection, fixed frames, fds.

TRUST LEVEL: unprivileged (runs in policyd). The broker is trusted to tell the truth about what
it opened, but its replies are still parsed strictly: a malformed reply or a wrong number of fds
is a BrokerError(PROTOCOL) and drops the connection. Synchronous and thread-safe (one lock around
each request/reply pair). docs/protocol.md describes the wire format.
"""

from __future__ import annotations

import array
import os
import socket
import stat
import threading
from dataclasses import dataclass

from broker import protocol
from broker.protocol import ErrorCode, Reply, ReplyKind, Request, RequestFlag, RequestKind

MAX_FDS_ACCEPTED = 4


@dataclass(frozen=True)
class Identity:
    major: int
    minor: int
    diskseq: int
    size: int
    backing_dev: int  # st_dev of the backing file (LOOP_FILE); 0 for OPEN_BLOCK
    backing_ino: int  # st_ino of the backing file (LOOP_FILE); 0 for OPEN_BLOCK


class BrokerError(Exception):
    """The broker refused a request (code says why) or the exchange failed."""

    def __init__(self, code: ErrorCode, errno: int, message: str) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({os.strerror(errno)})" if errno else ""))
        self.code = code
        self.errno = errno
        self.message = message


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached (not running, socket missing, connection dropped)."""

    def __init__(self, message: str, errno: int | None = 0) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, errno or 0, message)


def _identity(reply: Reply) -> Identity:
    return Identity(
        reply.major, reply.minor, reply.diskseq, reply.size, reply.backing_dev, reply.backing_ino
    )


class BrokerClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise BrokerUnavailable(f"cannot connect to {self.socket_path}", e.errno) from e
            self._sock = sock
        return self._sock

    def _exchange(self, request: Request, fds: list[int]) -> tuple[Reply, list[int]]:
        try:
            frame = protocol.encode_request(request)
        except protocol.FrameError as e:
            raise BrokerError(ErrorCode.BAD_ARGUMENT, 0, str(e)) from None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self._lock:
            # A connection that went stale (broker restarted) fails on send or with EOF; the
            # request is then retried once on a new connection. Retrying is safe: an fd the
            # broker had already sent on the dead connection is closed with it (AUTOCLEAR).
            for attempt in (1, 2):
                sock = self._connect()
                try:
                    sock.sendmsg([frame], ancillary)
                    data, ancdata, flags, _ = sock.recvmsg(
                        protocol.MAX_REPLY + 1,
                        socket.CMSG_SPACE(MAX_FDS_ACCEPTED * 4),
                        socket.MSG_CMSG_CLOEXEC,
                    )
                except OSError as e:
                    self._disconnect()
                    if attempt == 2:
                        raise BrokerUnavailable(f"broker connection failed: {e}", e.errno) from e
                    continue
                received = self._fds(ancdata)
                if not data and not received:
                    self._disconnect()  # the broker ended the connection
                    if attempt == 2:
                        raise BrokerUnavailable("broker closed the connection")
                    continue
                try:
                    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                        raise protocol.FrameError("truncated reply")
                    return protocol.parse_reply(data), received
                except protocol.FrameError as e:
                    for fd in received:
                        os.close(fd)
                    self._disconnect()
                    raise BrokerError(ErrorCode.PROTOCOL, 0, str(e)) from e
        raise AssertionError("unreachable")

    @staticmethod
    def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        return fds

    def _request(self, request: Request, fds: list[int], want_fd: bool) -> tuple[Reply, int]:
        reply, received = self._exchange(request, fds)
        expected = 1 if want_fd and reply.kind == ReplyKind.OK else 0
        if len(received) != expected:
            for fd in received:
                os.close(fd)
            with self._lock:
                self._disconnect()
            raise BrokerError(
                ErrorCode.PROTOCOL, 0, f"expected {expected} fds, got {len(received)}"
            )
        if reply.kind == ReplyKind.ERROR:
            raise BrokerError(reply.code, reply.errno, reply.message)
        return reply, received[0] if received else -1

    def open_block(
        self,
        path: str,
        *,
        writable: bool,
        expect_dev: tuple[int, int] | None = None,
        expect_diskseq: int | None = None,
    ) -> tuple[int, Identity]:
        flags = RequestFlag.WRITABLE if writable else RequestFlag(0)
        major = minor = diskseq = 0
        if expect_dev is not None:
            flags |= RequestFlag.EXPECT_DEV
            major, minor = expect_dev
        if expect_diskseq is not None:
            flags |= RequestFlag.EXPECT_DISKSEQ
            diskseq = expect_diskseq
        request = Request(
            RequestKind.OPEN_BLOCK, flags, 0, major, minor, diskseq, os.fsencode(path)
        )
        reply, fd = self._request(request, [], want_fd=True)
        return self._checked_fd(fd, reply), _identity(reply)

    def loop_file(
        self, path: str, *, writable: bool, direct_io: bool = False, block_size: int = 0
    ) -> tuple[int, Identity]:
        flags = RequestFlag.WRITABLE if writable else RequestFlag(0)
        if direct_io:
            flags |= RequestFlag.DIRECT_IO
        request = Request(RequestKind.LOOP_FILE, flags, block_size, path=os.fsencode(path))
        reply, fd = self._request(request, [], want_fd=True)
        return self._checked_fd(fd, reply), _identity(reply)

    def identify(self, fd: int) -> Identity:
        reply, _ = self._request(Request(RequestKind.IDENTIFY), [fd], want_fd=False)
        return _identity(reply)

    @staticmethod
    def _checked_fd(fd: int, reply: Reply) -> int:
        """The fd is the block device the reply names, or BrokerError(PROTOCOL)."""
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
            reply.major,
            reply.minor,
        ):
            os.close(fd)
            raise BrokerError(ErrorCode.PROTOCOL, 0, "the fd is not the device the reply names")
        return fd
