"""A commit whose reply is lost may have been applied: XenStore.transact says so with
CommitUnknown (not a plain XenStore error), so the exporter keeps the device's fd instead of
letting AUTOCLEAR free a number XenStore may now name. Runs against the stack's real oxenstored;
the fault is injected by a relay on the way (ReplyLosingRelay, a plain byte relay between
policyd's client and oxenstored) that loses the reply of a commit that really happened and then
closes the connection, or keeps it open and stays silent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from harness.stack import Stack
from pyxs._internal import Op

from policyd.errors import CommitUnknown, XenStoreError
from policyd.xenstore.client import Tx
from policyd.xenstore.connection import HEADER
from policyd.xenstore.store import XenStore

pytestmark = [pytest.mark.root, pytest.mark.daemon]


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
            if self.relay.passes(self.from_client, op, req_id, packet[HEADER.size :]):
                assert self.peer is not None and self.peer.transport is not None
                self.peer.transport.write(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ReplyLosingRelay:
    def __init__(self, path: Path, xenstored: Path, close_after_loss: bool) -> None:
        self.path, self.xenstored, self.close_after_loss = path, xenstored, close_after_loss
        self.commit_req_ids: set[int] = set()
        self.lost = 0
        self.clients: list[_Half] = []
        self.links: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None

    def passes(self, from_client: bool, op: int, req_id: int, payload: bytes) -> bool:
        if from_client:
            if op == Op.TRANSACTION_END and payload == b"T\0":
                self.commit_req_ids.add(req_id)
            return True
        if req_id not in self.commit_req_ids:
            return True
        self.lost += 1
        if self.close_after_loss:
            for half in self.clients:
                if half.transport is not None:
                    half.transport.close()
        return False

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
        await asyncio.gather(*self.links)
        await asyncio.sleep(0)


async def with_relay(
    stack: Stack,
    tmp_path: Path,
    close_after_loss: bool,
    body: Callable[[Tx], Awaitable[None]],
    xs_timeout_s: float,
) -> tuple[BaseException | None, bool]:
    relay = ReplyLosingRelay(tmp_path / "relay.sock", stack.xenstore_path, close_after_loss)
    await relay.start()
    xs = XenStore(str(relay.path), timeout_s=xs_timeout_s)
    try:
        raised: BaseException | None = None
        try:
            await xs.transact(body)
        except BaseException as e:
            raised = e
        assert relay.lost == 1
        return raised, xs.connected
    finally:
        xs.close()
        await relay.stop()


def write_body(node: str) -> Callable[[Tx], Awaitable[None]]:
    async def body(tx: Tx) -> None:
        await tx.write(node, "named")

    return body


@pytest.mark.parametrize("close_after_loss", [True, False], ids=["connection-lost", "silence"])
def test_lost_commit_reply_is_commit_unknown(
    stack: Stack, tmp_path: Path, close_after_loss: bool
) -> None:
    node = "/local/domain/0/commit-unknown-test"
    raised, connected = asyncio.run(
        with_relay(stack, tmp_path, close_after_loss, write_body(node), xs_timeout_s=1.0)
    )
    assert isinstance(raised, CommitUnknown), raised
    assert "may have been applied" in str(raised)
    assert stack.xs_read(node) == "named"  # it was applied: the caller must keep its fd
    assert not connected  # the broken connection is dropped; the next call reconnects

    async def read_again() -> str | None:
        xs = XenStore(str(stack.xenstore_path))
        try:
            return await xs.read_one(node)
        finally:
            xs.close()

    assert asyncio.run(read_again()) == "named"
    stack.xs_rm(node)


def test_failure_before_the_commit_is_a_plain_error(stack: Stack) -> None:
    """Nothing was committed: an ordinary XenStore error, and the fd may be closed."""
    node = "/local/domain/0/commit-unknown-body"

    async def body(tx: Tx) -> None:
        await tx.write(node, "never")
        raise XenStoreError("the body failed before the commit")

    async def run() -> None:
        xs = XenStore(str(stack.xenstore_path))
        try:
            with pytest.raises(XenStoreError) as e:
                await xs.transact(body)
            assert not isinstance(e.value, CommitUnknown)
            assert xs.connected  # rolled back on the same connection
        finally:
            xs.close()

    asyncio.run(run())
    assert not stack.xs_exists(node)
