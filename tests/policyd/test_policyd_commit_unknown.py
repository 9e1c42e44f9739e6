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

import pytest
from harness.stack import Stack
from xsrelay import ReplyLosingRelay

from policyd.errors import CommitUnknown, XenStoreError
from policyd.xenstore.client import Tx
from policyd.xenstore.store import XenStore

pytestmark = [pytest.mark.root, pytest.mark.daemon]


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
