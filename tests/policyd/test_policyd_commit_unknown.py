"""A commit whose reply is lost may have been applied: XenStore.transact says so with
CommitUnknown (not a plain XenStore error), so the exporter keeps the device's fd instead of
letting AUTOCLEAR free a number XenStore may now name. Runs against the stack's real oxenstored;
the fault is injected by losing the reply of a commit that really happened."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from harness.stack import Stack

from policyd.errors import CommitUnknown, XenStoreError
from policyd.xenstore import XenStore

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def lose_commit_reply(xs: XenStore) -> None:
    client: Any = xs._connect()
    real_commit = client.commit

    def commit_then_lose_the_reply() -> bool:
        real_commit()
        raise OSError(errno.ECONNRESET, "connection lost after the commit was sent")

    client.commit = commit_then_lose_the_reply


def test_lost_commit_reply_is_commit_unknown(stack: Stack) -> None:
    node = "/local/domain/0/commit-unknown-test"
    xs = XenStore(str(stack.xenstore_path))
    lose_commit_reply(xs)
    with pytest.raises(CommitUnknown, match="may have been applied"):
        xs.transact(lambda tx: tx.write(node, "named"))
    assert stack.xs_read(node) == "named"  # it was applied: the caller must keep its fd
    assert not xs.connected  # the broken connection is dropped; the next call reconnects
    assert xs.read_one(node) == "named"
    stack.xs_rm(node)
    xs.close()


def test_failure_before_the_commit_is_a_plain_error(stack: Stack) -> None:
    """Nothing was committed: an ordinary XenStore error, and the fd may be closed."""
    node = "/local/domain/0/commit-unknown-body"
    xs = XenStore(str(stack.xenstore_path))

    def body(tx: Any) -> None:
        tx.write(node, "never")
        raise XenStoreError("the body failed before the commit")

    with pytest.raises(XenStoreError) as e:
        xs.transact(body)
    assert not isinstance(e.value, CommitUnknown)
    assert not stack.xs_exists(node)
    xs.close()
