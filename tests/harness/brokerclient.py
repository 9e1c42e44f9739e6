"""A blocking, thread-safe client for the broker, for the broker tests and bench/bench_broker.py.

Test harness code (runs as whichever user the test picks). policyd itself uses
policyd.brokerclient.AsyncBrokerClient; this client shares its framing, its checks of every reply
and fd, and its connection handling (reconnect once after a drop), and differs only in waiting
for the reply on a blocking socket.
"""

from __future__ import annotations

import threading

from broker.protocol import Reply, Request, RequestKind
from policyd.brokerclient import (
    BrokerError,
    BrokerUnavailable,
    Identity,
    _Connection,
    _decode,
    _encode,
    _identity,
    _ProtocolViolation,
    _recvmsg,
    loop_file_request,
    open_block_request,
)

__all__ = ["BrokerClient", "BrokerError", "BrokerUnavailable", "Identity"]


class BrokerClient:
    """Blocking client, thread-safe (one lock around each request/reply pair); for the tests and
    benchmarks. policyd itself uses AsyncBrokerClient."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._conn = _Connection(socket_path, blocking=True)

    def close(self) -> None:
        with self._lock:
            self._conn.disconnect()

    def _request(self, request: Request, fds: list[int], want_fd: bool) -> tuple[Reply, int]:
        frame, ancillary = _encode(request, fds)
        with self._lock:
            for attempt in (1, 2):
                sock = self._conn.connect()
                try:
                    sock.sendmsg([frame], ancillary)
                    decoded = _decode(*_recvmsg(sock), want_fd)
                except OSError as e:
                    self._conn.failed(attempt, e)
                    continue
                except _ProtocolViolation:
                    self._conn.disconnect()
                    raise
                if decoded is None:
                    self._conn.failed(attempt, None)
                    continue
                return decoded
        raise AssertionError("unreachable")

    def open_block(
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
        reply, fd = self._request(request, [], want_fd=True)
        return fd, _identity(reply)

    def loop_file(
        self, path: str, *, writable: bool, direct_io: bool = False, block_size: int = 0
    ) -> tuple[int, Identity]:
        request = loop_file_request(
            path, writable=writable, direct_io=direct_io, block_size=block_size
        )
        reply, fd = self._request(request, [], want_fd=True)
        return fd, _identity(reply)

    def identify(self, fd: int) -> Identity:
        reply, _ = self._request(Request(RequestKind.IDENTIFY), [fd], want_fd=False)
        return _identity(reply)
