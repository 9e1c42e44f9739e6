"""A byte relay between a XenStore client and the real oxenstored that loses one kind of
packet on purpose: the reply of a commit that really happened (the client cannot know it was
applied), or the commit request itself (never applied), then closes the connection or stays
silent. Test code (root); the relay only forwards whole packets, unchanged.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import cast

from pyxs._internal import Op

from policyd.xenstore.connection import HEADER


class _Half(asyncio.Protocol):
    """One side of the relay: what it receives goes to `peer`, packet by packet, through
    `relay.passes` (False: the packet is lost)."""

    def __init__(self, relay: ReplyLosingRelay, from_client: bool) -> None:
        self.relay, self.from_client = relay, from_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.peer is not None and len(self.buffer) >= HEADER.size:
            op, req_id, _tx, size = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                return
            packet = self.buffer[: HEADER.size + size]
            self.buffer = self.buffer[HEADER.size + size :]
            client = self if self.from_client else self.peer
            if self.relay.passes(client, self.from_client, op, req_id, packet[HEADER.size :]):
                assert self.peer is not None and self.peer.transport is not None
                self.peer.transport.write(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ReplyLosingRelay:
    """While `armed`, loses the reply of every commit (drop_request: the commit request
    itself, so xenstored never applies it; the connection is then closed); `once` disarms it
    after the first loss. `close_after_loss` closes every client connection after a lost reply
    (the client sees the connection fail), else the relay stays silent."""

    def __init__(
        self,
        path: Path,
        xenstored: Path,
        close_after_loss: bool,
        *,
        armed: bool = True,
        once: bool = False,
        drop_request: bool = False,
    ) -> None:
        self.path, self.xenstored, self.close_after_loss = path, xenstored, close_after_loss
        self.armed, self.once, self.drop_request = armed, once, drop_request
        self.commit_req_ids: set[tuple[int, int]] = set()  # (client half, request id)
        self.lost = 0
        self.clients: list[_Half] = []
        self.links: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None

    def passes(self, client: _Half | None, from_client: bool, op: int, req_id: int,
               payload: bytes) -> bool:  # fmt: skip
        key = (id(client), req_id)
        if from_client:
            if self.armed and op == Op.TRANSACTION_END and payload == b"T\0":
                if self.drop_request:
                    self._lose()
                    self._close_clients()
                    return False
                self.commit_req_ids.add(key)
            return True
        if key not in self.commit_req_ids:
            return True
        self.commit_req_ids.discard(key)
        self._lose()
        if self.close_after_loss:
            self._close_clients()
        return False

    def _lose(self) -> None:
        self.lost += 1
        if self.once:
            self.armed = False

    def _close_clients(self) -> None:
        for half in self.clients:
            if half.transport is not None:
                half.transport.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def accept() -> _Half:
            client = _Half(self, from_client=True)
            self.clients.append(client)
            self.links.append(loop.create_task(self._link(client)))
            return client

        self._server = await loop.create_unix_server(accept, str(self.path))

    async def _link(self, client: _Half) -> None:
        """Give an accepted client its own connection to oxenstored; until then what the
        client sends waits in its buffer."""
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_unix_connection(
            lambda: _Half(self, from_client=False), str(self.xenstored)
        )
        client.peer, upstream.peer = upstream, client
        client.data_received(b"")

    async def stop(self) -> None:
        for client in self.clients:
            for half in (client, client.peer):
                if half is not None and half.transport is not None:
                    half.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self.links, return_exceptions=True)
        await asyncio.sleep(0)


class RelayThread:
    """A relay on an event loop of its own thread, for a test whose client is another process
    (policyd): its socket is open to every user (policyd runs as its own)."""

    def __init__(self, relay: ReplyLosingRelay) -> None:
        self.relay = relay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)
        os.chmod(self.relay.path, 0o666)

    def arm(self, *, drop_request: bool) -> None:
        """Lose the next commit's reply (or request), once."""

        def arm() -> None:
            self.relay.drop_request, self.relay.once, self.relay.armed = drop_request, True, True

        self.loop.call_soon_threadsafe(arm)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
