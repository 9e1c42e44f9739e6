"""HostileXenstored: a stand-in for xenstored, for what the real one never does.

Test code. A tiny unix socket server on the test's event loop that speaks xenstored's wire format
(pyxs's header) and answers like a minimal XenStore (every READ "value", every DIRECTORY empty,
writes OK, transaction id 7) unless a test's `script` answers a request otherwise: with raw
bytes (oversized, truncated, misaddressed replies), nothing at all, or a closed connection. Real
xenstored does not send malformed replies, so these cases cannot be made with it; everything
else is tested against the real oxenstored (tests/harness).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

from pyxs._internal import Op

from policyd.xenstore.connection import HEADER

TX_ID = 7
CLOSE = object()  # a script's answer: close the connection instead of replying


def frame(op: int, req_id: int, tx_id: int, payload: bytes, size: int | None = None) -> bytes:
    """One packet; `size` overrides the header's length field."""
    return HEADER.pack(op, req_id, tx_id, len(payload) if size is None else size) + payload


def normal_reply(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if op == Op.TRANSACTION_START:
        return frame(op, req_id, tx_id, b"%d\0" % TX_ID)
    if op == Op.READ:
        return frame(op, req_id, tx_id, b"value")
    if op == Op.DIRECTORY:
        return frame(op, req_id, tx_id, b"")
    return frame(op, req_id, tx_id, b"OK\0")


# (op, req_id, tx_id, payload) -> bytes to send, None (no reply), CLOSE, or NotImplemented
# (answer normally)
Script = Callable[[int, int, int, bytes], object]


class _Peer(asyncio.Protocol):
    def __init__(self, server: HostileXenstored) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.server.peers.append(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            op, req_id, tx_id, size = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                return
            payload = self.buffer[HEADER.size : HEADER.size + size]
            self.buffer = self.buffer[HEADER.size + size :]
            self.server.requests.append((op, payload))
            answer = self.server.script(op, req_id, tx_id, payload)
            if answer is NotImplemented:
                answer = normal_reply(op, req_id, tx_id, payload)
            if answer is CLOSE:
                self.transport.close()
                return
            if isinstance(answer, bytes):
                self.transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.peers.remove(self)


class HostileXenstored:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.script: Script = lambda *_: NotImplemented
        self.requests: list[tuple[int, bytes]] = []
        self.connections = 0
        self.peers: list[_Peer] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Peer(self), str(self.path))

    async def stop(self) -> None:
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for _ in range(3):  # let the transports' close callbacks run
            await asyncio.sleep(0)
        if self.path.exists():
            os.unlink(self.path)
