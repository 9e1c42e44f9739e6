"""policyd's client for the privileged broker: one SOCK_SEQPACKET connection, fixed frames, fds.

TRUST LEVEL: unprivileged (runs in policyd). The broker is trusted to tell the truth about what
it opened, but its replies are still parsed strictly: a malformed reply or a wrong number of fds
is a BrokerError(PROTOCOL) and drops the connection. AsyncBrokerClient is policyd's transport,
on its event loop; the framing, the checks and _Connection are shared with the blocking client
of the tests and benchmarks (tests/harness/brokerclient.py). docs/protocol.md describes the
wire format.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
from dataclasses import dataclass

from broker import protocol
from broker.protocol import ErrorCode, Reply, ReplyKind, Request, RequestFlag, RequestKind

MAX_FDS_ACCEPTED = 4
MAX_REPLY = protocol.REPLY_HEADER.size + protocol.MAX_MESSAGE


# The client's half of the wire format; the layouts, enums and the broker's half (parse_request,
# encode_reply) are broker.protocol, which keeps only what the broker runs.
def encode_request(request: Request) -> bytes:
    path = bytes(request.path)
    frame = (
        protocol.REQUEST_HEADER.pack(
            protocol.PROTOCOL_VERSION, *list(vars(request).values())[:-1], len(path), 0
        )
        + path
    )
    protocol.parse_request(frame)  # what we send obeys the same rules as what we accept
    return frame


def parse_reply(untrusted_frame: bytes) -> Reply:
    """The reply in a frame from the broker; FrameError unless it is exactly a valid frame."""
    header = protocol.REPLY_HEADER
    if not header.size <= len(untrusted_frame) <= MAX_REPLY:
        raise protocol.FrameError(f"reply length {len(untrusted_frame)} out of range")
    fields = header.unpack_from(untrusted_frame)
    version, kind, code, errno, major, minor, seq, size, dev, ino, message_len, reserved = fields
    if version != protocol.PROTOCOL_VERSION or reserved != 0:
        raise protocol.FrameError("bad reply header")
    if kind not in ReplyKind.__members__.values() or code not in ErrorCode.__members__.values():
        raise protocol.FrameError(f"unknown reply kind {kind} or error code {code}")
    if (kind == ReplyKind.OK) != (code == ErrorCode.OK):
        raise protocol.FrameError("reply kind and code disagree")
    if message_len != len(untrusted_frame) - header.size:
        raise protocol.FrameError("message length does not match the frame length")
    try:
        message = bytes(untrusted_frame[header.size :]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise protocol.FrameError("message is not UTF-8") from e
    return Reply(
        ReplyKind(kind), ErrorCode(code), errno, major, minor, seq, size, dev, ino, message
    )


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


def open_block_request(
    path: str,
    *,
    writable: bool,
    expect_dev: tuple[int, int] | None = None,
    expect_diskseq: int | None = None,
) -> Request:
    flags = RequestFlag.WRITABLE if writable else RequestFlag(0)
    major = minor = diskseq = 0
    if expect_dev is not None:
        flags |= RequestFlag.EXPECT_DEV
        major, minor = expect_dev
    if expect_diskseq is not None:
        flags |= RequestFlag.EXPECT_DISKSEQ
        diskseq = expect_diskseq
    return Request(RequestKind.OPEN_BLOCK, flags, 0, major, minor, diskseq, os.fsencode(path))


def loop_file_request(
    path: str, *, writable: bool, direct_io: bool = False, block_size: int = 0
) -> Request:
    flags = RequestFlag.WRITABLE if writable else RequestFlag(0)
    if direct_io:
        flags |= RequestFlag.DIRECT_IO
    return Request(RequestKind.LOOP_FILE, flags, block_size, path=os.fsencode(path))


def _encode(request: Request, fds: list[int]) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    try:
        frame = encode_request(request)
    except protocol.FrameError as e:
        raise BrokerError(ErrorCode.BAD_ARGUMENT, 0, str(e)) from None
    fd_bytes = array.array("i", fds).tobytes()
    return frame, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes)] if fds else []


def _recvmsg(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_REPLY + 1, socket.CMSG_SPACE(MAX_FDS_ACCEPTED * 4), socket.MSG_CMSG_CLOEXEC
    )
    return data, ancdata, flags


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    return fds


class _ProtocolViolation(BrokerError):
    """A malformed reply or wrong fd count: the connection must be dropped."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.PROTOCOL, 0, message)


def _decode(
    data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, want_fd: bool
) -> tuple[Reply, int] | None:
    """The reply and its fd (-1 if none); None if the broker ended the connection. Raises
    _ProtocolViolation (every received fd closed) or the BrokerError the broker answered."""
    received = _fds(ancdata)
    if not data and not received:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise protocol.FrameError("truncated reply")
        reply = parse_reply(data)
        expected = 1 if want_fd and reply.kind == ReplyKind.OK else 0
        if len(received) != expected:
            raise protocol.FrameError(f"expected {expected} fds, got {len(received)}")
        fd = received[0] if received else -1
        if fd >= 0:
            _check_fd(fd, reply)
    except protocol.FrameError as e:
        for fd in received:
            os.close(fd)
        raise _ProtocolViolation(str(e)) from None
    if reply.kind == ReplyKind.ERROR:
        raise BrokerError(reply.code, reply.errno, reply.message)
    return reply, fd


def _check_fd(fd: int, reply: Reply) -> None:
    """The fd is the block device the reply names, or FrameError."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
        reply.major,
        reply.minor,
    ):
        raise protocol.FrameError("the fd is not the device the reply names")


class _Connection:
    """The socket both clients share the handling of: connect lazily, drop on any failure."""

    def __init__(self, socket_path: str, blocking: bool) -> None:
        self.socket_path = socket_path
        self.blocking = blocking
        self.sock: socket.socket | None = None

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise BrokerUnavailable(f"cannot connect to {self.socket_path}", e.errno) from e
            # connect() above is local and immediate; only the reply is waited for
            sock.setblocking(self.blocking)
            self.sock = sock
        return self.sock

    def failed(self, attempt: int, error: OSError | None) -> None:
        """A stale connection (broker restarted) fails on send or with EOF: the request is
        retried once on a new connection. Retrying is safe: an fd the broker had already sent
        on the dead connection is closed with it (AUTOCLEAR)."""
        self.disconnect()
        if attempt == 2 and error is not None:
            raise BrokerUnavailable(f"broker connection failed: {error}", error.errno) from error
        if attempt == 2:
            raise BrokerUnavailable("broker closed the connection")


class AsyncBrokerClient:
    """policyd's client, on its event loop: the socket is non-blocking and the reply is
    awaited with a reader callback, so a request costs no thread hand-off. Requests are
    serialized (one asyncio lock). A request cancelled while waiting (a timeout) drops the
    connection: a reply still in flight, and the fd it carries, are discarded by the kernel
    with the socket, so no fd leaks and no late reply is read as the next request's."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = asyncio.Lock()
        self._conn = _Connection(socket_path, blocking=False)

    def close(self) -> None:
        self._conn.disconnect()

    async def _request(self, request: Request, fds: list[int], want_fd: bool) -> tuple[Reply, int]:
        frame, ancillary = _encode(request, fds)
        async with self._lock:
            for attempt in (1, 2):
                sock = self._conn.connect()
                try:
                    sock.sendmsg([frame], ancillary)  # EAGAIN (a stuck broker) is an OSError
                    decoded = _decode(*await _recv_async(sock), want_fd)
                except OSError as e:
                    self._conn.failed(attempt, e)
                    continue
                except _ProtocolViolation:
                    self._conn.disconnect()
                    raise
                except BrokerError:
                    raise  # the broker's answer: the connection stays
                except BaseException:  # cancelled while waiting (a timeout)
                    self._conn.disconnect()
                    raise
                if decoded is None:
                    self._conn.failed(attempt, None)
                    continue
                return decoded
        raise AssertionError("unreachable")

    async def open_block(
        self,
        path: str,
        *,
        writable: bool,
        expect_dev: tuple[int, int] | None = None,
        expect_diskseq: int | None = None,
    ) -> tuple[int, Identity]:
        request = open_block_request(
            path, writable=writable, expect_dev=expect_dev, expect_diskseq=expect_diskseq
        )
        reply, fd = await self._request(request, [], want_fd=True)
        return fd, _identity(reply)

    async def loop_file(
        self, path: str, *, writable: bool, direct_io: bool = False, block_size: int = 0
    ) -> tuple[int, Identity]:
        request = loop_file_request(
            path, writable=writable, direct_io=direct_io, block_size=block_size
        )
        reply, fd = await self._request(request, [], want_fd=True)
        return fd, _identity(reply)

    async def identify(self, fd: int) -> Identity:
        reply, _ = await self._request(Request(RequestKind.IDENTIFY), [fd], want_fd=False)
        return _identity(reply)


async def _recv_async(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
    """recvmsg on a non-blocking socket, waiting on the event loop until a reply is there."""
    loop = asyncio.get_running_loop()
    fileno = sock.fileno()  # kept: close() during the wait makes sock.fileno() -1
    while True:
        try:
            return _recvmsg(sock)
        except BlockingIOError:
            pass
        readable = loop.create_future()
        loop.add_reader(fileno, _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fileno)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
