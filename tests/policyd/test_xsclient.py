"""policyd's asyncio XenStore client (policyd.xenstore: connection, client, store).

Against the real oxenstored of tests/harness (root, daemon) where the behaviour is real: a
pipelined batch, a transaction conflict retried, reconnecting after the connection is closed
under the client and after oxenstored restarts. Against HostileXenstored (tests/policyd/xsfake.py),
a stand-in for xenstored used only because the real one does not send malformed replies:
an oversized payload, an unknown req_id, a truncated header then EOF, a wrong op, a wrong
transaction id, a reply that never comes, a lost commit reply, a flood of watch events. Each of
those checks that the error is Error.XenStore (named, with a message saying what happened),
that the connection was dropped, and that no task or fd is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from harness.loops import open_fds
from harness.stack import Stack, StackConfig
from pyxs._internal import Op
from xsfake import CLOSE, TX_ID, HostileXenstored, frame

from policyd.errors import CommitUnknown, NotFound, XenStoreError
from policyd.xenstore.client import BATCH_MAX, Tx
from policyd.xenstore.connection import (
    WATCH_EVENTS_MAX,
    XENSTORE_PAYLOAD_MAX,
    XenStoreProtocolError,
    XenStoreTimeout,
)
from policyd.xenstore.store import XenStore

SHORT_TIMEOUT_S = 0.3


def run_clean(
    scenario: Callable[[], Awaitable[None]], harness: dict[str, list[str]] | None = None
) -> None:
    """Run the scenario on a fresh loop; afterwards no fd of it is open and no task was left
    (`harness`: the fds the scenario saw the test harness open and close, not the client)."""
    before = open_fds()

    async def checked() -> None:
        await scenario()
        for _ in range(3):  # closed transports release their fds on the next iterations
            await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(checked())
    harness = harness or {}
    # what the scenario left open that was not open before and the harness did not open; fds
    # of earlier tests' helpers that close meanwhile (pyxs reader threads) do not count
    left = Counter(open_fds()) - Counter(before) - Counter(harness.get("opened", []))
    assert not left, f"left open: {sorted(left.elements())}"


# -- a hostile stand-in for xenstored ----------------------------------------------------------


def hostile(
    tmp_path: Path, case: Callable[[HostileXenstored, XenStore], Awaitable[None]]
) -> HostileXenstored:
    server = HostileXenstored(tmp_path / "xenstored.sock")

    async def scenario() -> None:
        await server.start()
        baseline = Counter(open_fds())
        xs = XenStore(str(server.path), timeout_s=SHORT_TIMEOUT_S)
        try:
            await case(server, xs)
            await no_dropped_connection_open(server, xs, baseline)
        finally:
            xs.close()
            await server.stop()

    run_clean(scenario)
    return server


async def no_dropped_connection_open(
    server: HostileXenstored, xs: XenStore, baseline: Counter[str]
) -> None:
    """Checked before the stand-in closes its ends (which would close ours too): every
    connection the client dropped is closed on its side; only the current one is open."""
    live = 1 if xs.connected else 0
    for _ in range(50):
        if len(server.peers) == live:
            break
        await asyncio.sleep(0.01)
    assert len(server.peers) == live
    new = Counter(open_fds()) - baseline  # fds of earlier tests closing meanwhile do not count
    assert sum(new.values()) == 2 * live  # its socket and the stand-in's end


async def read(xs: XenStore, path: str = "/local/domain/0/name") -> str | None:
    return await xs.read_one(path)


async def assert_dropped(
    xs: XenStore, server: HostileXenstored, error: type[XenStoreError], match: str
) -> None:
    """The first read fails with `error`, the connection is gone, the next read reconnects."""
    with pytest.raises(error, match=match) as e:
        await read(xs)
    assert e.value.name == "XenStore"  # org.qubes.BlockBroker1.Error.XenStore on the bus
    assert not xs.connected
    server.script = lambda *_: NotImplemented
    assert await read(xs) == "value"
    assert xs.connected and server.connections == 2


def on_read(answer: Callable[[int, int], object]) -> Callable[[int, int, int, bytes], object]:
    def script(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
        return answer(req_id, tx_id) if op == Op.READ else NotImplemented

    return script


def test_a_normal_reply_is_read(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        assert await read(xs) == "value"
        assert xs.connected

    hostile(tmp_path, case)


def test_oversized_payload(tmp_path: Path) -> None:
    size = XENSTORE_PAYLOAD_MAX + 1

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.READ, req_id, tx, b"x" * size))
        await assert_dropped(xs, server, XenStoreProtocolError, f"{size}-byte payload")

    hostile(tmp_path, case)


def test_oversized_length_field_alone_is_refused(tmp_path: Path) -> None:
    """The header's length is checked before any payload is waited for."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.READ, req_id, tx, b"", 1 << 31))
        await assert_dropped(xs, server, XenStoreProtocolError, f"{1 << 31}-byte payload")

    hostile(tmp_path, case)


def test_unknown_req_id(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.READ, req_id + 1000, tx, b"value"))
        await assert_dropped(xs, server, XenStoreProtocolError, "no request is waiting for")

    hostile(tmp_path, case)


def test_a_second_reply_to_one_request(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        def twice(req_id: int, tx: int) -> bytes:
            return frame(Op.READ, req_id, tx, b"value") * 2

        server.script = on_read(twice)
        assert await read(xs) == "value"  # the first answers the request
        for _ in range(3):
            await asyncio.sleep(0)
        assert not xs.connected  # the second answers none: protocol error, dropped
        server.script = lambda *_: NotImplemented
        assert await read(xs) == "value"

    hostile(tmp_path, case)


def test_truncated_header_then_eof(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        def half_then_close(req_id: int, tx: int) -> object:
            peer = server.peers[-1]
            assert peer.transport is not None
            peer.transport.write(frame(Op.READ, req_id, tx, b"value")[:8])
            return CLOSE

        server.script = on_read(half_then_close)
        await assert_dropped(xs, server, XenStoreError, "after 8 bytes of a reply")

    hostile(tmp_path, case)


def test_wrong_op(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.WRITE, req_id, tx, b"OK\0"))
        await assert_dropped(xs, server, XenStoreProtocolError, f"op {Op.WRITE} to request")

    hostile(tmp_path, case)


def test_wrong_transaction_id(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.READ, req_id, tx + 1, b"value"))
        with pytest.raises(XenStoreProtocolError, match=f"in transaction {TX_ID + 1}"):
            await xs.transact(lambda tx: tx.read("/local/domain/0/name"))
        assert not xs.connected

    hostile(tmp_path, case)


def test_transaction_id_zero_is_refused(tmp_path: Path) -> None:
    """Id 0 means no transaction: writes sent with it would be applied at once, one by one."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        def start_zero(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
            if op == Op.TRANSACTION_START:
                return frame(op, req_id, tx_id, b"0\0")
            return NotImplemented

        server.script = start_zero
        with pytest.raises(XenStoreProtocolError, match="not a transaction id"):
            await xs.transact(lambda tx: tx.write("/local/domain/0/x", "y"))
        assert not xs.connected
        assert Op.WRITE not in [op for op, _ in server.requests]

    hostile(tmp_path, case)


def test_reply_never_comes(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: None)
        started = asyncio.get_running_loop().time()
        await assert_dropped(xs, server, XenStoreTimeout, "did not answer in time")
        assert asyncio.get_running_loop().time() - started < SHORT_TIMEOUT_S + 1

    hostile(tmp_path, case)


def test_an_error_reply_keeps_the_connection(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.ERROR, req_id, tx, b"EACCES\0"))
        with pytest.raises(XenStoreError, match="Permission denied"):
            await read(xs)
        assert xs.connected and server.connections == 1

    hostile(tmp_path, case)


def commit_answer(answer: object) -> Callable[[int, int, int, bytes], object]:
    def script(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
        if op == Op.TRANSACTION_END and payload == b"T\0":
            return answer
        return NotImplemented

    return script


def test_commit_reply_lost_with_the_connection(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = commit_answer(CLOSE)
        with pytest.raises(CommitUnknown, match="may have been applied") as e:
            await xs.transact(lambda tx: tx.write("/local/domain/0/x", "y"))
        assert e.value.name == "XenStore"
        assert not xs.connected
        server.script = lambda *_: NotImplemented
        await xs.transact(lambda tx: tx.write("/local/domain/0/x", "y"))  # reconnects

    hostile(tmp_path, case)


def test_commit_reply_never_comes(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = commit_answer(None)
        with pytest.raises(CommitUnknown, match="did not answer in time"):
            await xs.transact(lambda tx: tx.write("/local/domain/0/x", "y"))
        assert not xs.connected

    hostile(tmp_path, case)


def test_failure_before_the_commit_is_not_commit_unknown(tmp_path: Path) -> None:
    """The connection dies while the body runs: nothing was committed, a plain error."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: CLOSE)
        with pytest.raises(XenStoreError) as e:
            await xs.transact(lambda tx: tx.read("/local/domain/0/name"))
        assert not isinstance(e.value, CommitUnknown)
        assert (Op.TRANSACTION_END, b"T\0") not in server.requests

    hostile(tmp_path, case)


def test_watch_events_are_ignored_up_to_a_bound(tmp_path: Path) -> None:
    event = frame(Op.WATCH_EVENT, 0, 0, b"/local/domain/0\0token\0")

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        some = WATCH_EVENTS_MAX // 2
        server.script = on_read(
            lambda req_id, tx: event * some + frame(Op.READ, req_id, tx, b"value")
        )
        assert await read(xs) == "value"
        assert await read(xs) == "value"  # 2 * some: at the bound, still fine
        server.script = on_read(
            lambda req_id, tx: event * 10_000 + frame(Op.READ, req_id, tx, b"value")
        )
        with pytest.raises(XenStoreProtocolError, match="watch events"):
            await read(xs)
        assert not xs.connected

    hostile(tmp_path, case)


def test_a_batch_is_one_write_and_replies_match_by_req_id(tmp_path: Path) -> None:
    """Replies sent in reverse order still land with their own requests."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        held: list[bytes] = []

        def reverse(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
            if op != Op.READ:
                return NotImplemented
            held.append(frame(op, req_id, tx_id, payload.rstrip(b"\0")))
            return b"".join(reversed(held)) if len(held) == 3 else None

        server.script = reverse
        paths = ["/a", "/b", "/c"]
        assert await xs.reads(lambda tx: tx.read_many(paths)) == paths

    hostile(tmp_path, case)


def test_writes_outside_a_transaction_are_refused(tmp_path: Path) -> None:
    async def case(server: HostileXenstored, xs: XenStore) -> None:
        with pytest.raises(XenStoreError, match="outside a transaction"):
            await xs.reads(lambda tx: tx.write("/local/domain/0/x", "y"))
        assert Op.WRITE not in [op for op, _ in server.requests]

    hostile(tmp_path, case)


def test_no_xenstored_is_a_named_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        xs = XenStore(str(tmp_path / "nothing-here"))
        with pytest.raises(XenStoreError, match="cannot connect to xenstored"):
            await read(xs)
        assert not xs.connected

    run_clean(scenario)


# -- the real oxenstored ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_config() -> StackConfig:
    return StackConfig(domains={"work": 1}, broker=False, policyd=False)


@pytest.fixture
def node(stack: Stack) -> Iterator[str]:
    base = "/local/domain/0/xsclient-test"
    yield base
    if stack.xs_exists(base):
        stack.xs_rm(base)


@pytest.mark.root
@pytest.mark.daemon
def test_real_pipelined_batch(stack: Stack, node: str) -> None:
    count = BATCH_MAX + 8  # two chunks
    paths = [f"{node}/n{i}" for i in range(count)]

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path))
        writes: list[int] = []
        try:
            await xs.transact(lambda tx: tx.write_many([(p, f"v{i}") for i, p in enumerate(paths)]))
            assert xs._conn is not None
            transport = xs._conn._transport
            assert transport is not None
            real_write = transport.write

            def counting(data: bytes | bytearray | memoryview) -> None:
                writes.append(len(data))
                real_write(data)

            transport.write = counting  # type: ignore[method-assign]
            values = await xs.reads(lambda tx: tx.read_many(paths))
        finally:
            xs.close()
        assert values == [f"v{i}" for i in range(count)]
        assert len(writes) == 2  # one write per chunk of BATCH_MAX requests

    run_clean(scenario)
    assert stack.xs_read(f"{node}/n{count - 1}") == f"v{count - 1}"


@pytest.mark.root
@pytest.mark.daemon
def test_real_conflict_is_retried(stack: Stack, node: str) -> None:
    """Another client writes what the transaction read, before its commit: EAGAIN, retried."""
    counter = f"{node}/counter"
    stack.xs_write(counter, "1")
    attempts: list[str | None] = []

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path))

        async def increment(tx: Tx) -> None:
            value = await tx.read(counter)
            attempts.append(value)
            if len(attempts) == 1:
                stack.xs_write(counter, "10")  # a concurrent writer (pyxs, its own connection)
            await tx.write(counter, str(int(value or "0") + 1))

        try:
            await xs.transact(increment)
        finally:
            xs.close()

    run_clean(scenario)
    assert attempts == ["1", "10"]
    assert stack.xs_read(counter) == "11"


@pytest.mark.root
@pytest.mark.daemon
def test_real_transaction_ahead_serves_the_first_attempt_only(stack: Stack, node: str) -> None:
    """A transaction started ahead (transaction_ahead: Attach starts it while the broker
    opens the device) is the first attempt's: a write by another client after its start makes
    that commit conflict, and the retry runs in a transaction of its own, which sees it."""
    counter = f"{node}/counter"
    stack.xs_write(counter, "1")
    attempts: list[str | None] = []

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path))

        async def increment(tx: Tx) -> float:
            value = await tx.read(counter)
            attempts.append(value)
            await tx.write(counter, str(int(value or "0") + 1))
            return time.monotonic()

        try:
            async with xs.transaction_ahead() as ahead:
                await asyncio.sleep(0.05)  # what the caller awaits meanwhile (the broker)
                stack.xs_write(counter, "10")  # another client, after the start
                before = time.monotonic()
                tx_done = await xs.transact(increment, ahead)
            assert tx_done > before and ahead.taken
            assert await xs.reads(lambda tx: tx.read(counter)) == "11"  # the turn is free
        finally:
            xs.close()

    run_clean(scenario)
    assert attempts == ["1", "10"]  # the ahead snapshot, then a fresh transaction


@pytest.mark.root
@pytest.mark.daemon
def test_real_transaction_ahead_leaves_the_turn_and_survives_a_dropped_connection(
    stack: Stack, node: str
) -> None:
    """While an ahead transaction waits for its body (the broker's request in flight), other
    operations run (the turn is not held: a watch's read must not fail "busy" behind a slow
    broker). If the connection drops meanwhile, the transact() runs in a fresh transaction
    on a new connection: nothing of the body had been sent in the old one."""

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path), timeout_s=SHORT_TIMEOUT_S)
        try:
            async with xs.transaction_ahead() as ahead:
                assert await read(xs) == "Domain-0"  # would wait for the turn and fail
                conn = xs._conn
                assert conn is not None
                conn.abort(XenStoreError("dropped under the ahead transaction"))
                await xs.transact(lambda tx: tx.write(f"{node}/x", "fresh"), ahead)
            assert xs._conn is not conn and xs.connected
        finally:
            xs.close()

    run_clean(scenario)
    assert stack.xs_read(f"{node}/x") == "fresh"


@pytest.mark.root
@pytest.mark.daemon
def test_real_unused_transaction_ahead_is_rolled_back(stack: Stack, node: str) -> None:
    """Attach failed between the start and the body (the broker refused): the transaction is
    rolled back on the same connection, which stays up; cancelled instead, the connection is
    dropped (ending the transaction) and the next operation connects again. Nothing left."""
    stack.xs_write(f"{node}/x", "kept")

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path))
        try:
            await read(xs)
            conn = xs._conn
            with pytest.raises(NotFound):
                async with xs.transaction_ahead():
                    await asyncio.sleep(0)
                    raise NotFound("the broker refused")
            assert xs._conn is conn and xs.connected
            await xs.transact(lambda tx: tx.write(f"{node}/x", "after"))

            async def cancelled() -> None:
                async with xs.transaction_ahead():
                    await asyncio.sleep(10)

            task = asyncio.ensure_future(cancelled())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not xs.connected
            assert await xs.reads(lambda tx: tx.read(f"{node}/x")) == "after"
        finally:
            xs.close()

    run_clean(scenario)


@pytest.mark.root
@pytest.mark.daemon
def test_real_reconnect_after_the_socket_is_closed(stack: Stack) -> None:
    async def scenario() -> None:
        changes: list[bool] = []
        xs = XenStore(str(stack.xenstore_path), on_connection_changed=changes.append)
        try:
            assert await xs.domain_name(1) == "work"
            assert xs._conn is not None and xs._conn._transport is not None
            sock = xs._conn._transport.get_extra_info("socket")
            sock.shutdown(socket.SHUT_RDWR)  # the connection ends under the client: EOF
            for _ in range(20):
                if not xs.connected:
                    break
                await asyncio.sleep(0.01)
            assert changes == [True, False]  # told at once, not at the next operation
            assert await xs.domain_name(1) == "work"
            assert changes == [True, False, True]
        finally:
            xs.close()

    run_clean(scenario)


@pytest.mark.root
@pytest.mark.daemon
def test_watches_are_set_again_at_once_after_the_connection_drops(stack: Stack) -> None:
    """With watches set, a lost connection (a xenstored restart looks the same) is replaced at
    once, without waiting for the next operation, and the watches fire again on it."""

    async def scenario() -> None:
        changes: list[bool] = []
        seen: list[str] = []
        xs = XenStore(str(stack.xenstore_path), on_connection_changed=changes.append)
        try:
            await xs.watch("/local/domain/1/name", "frontend-1", lambda p, t: seen.append(p))
            assert xs._conn is not None and xs._conn._transport is not None
            sock = xs._conn._transport.get_extra_info("socket")
            sock.shutdown(socket.SHUT_RDWR)
            for _ in range(200):
                if changes[-1:] == [True] and len(changes) >= 3:
                    break
                await asyncio.sleep(0.01)
            assert changes == [True, False, True]  # reconnected with no operation asked
            fired = len(seen)
            stack.xs_write("/local/domain/1/name", "work")  # an event on the new connection
            for _ in range(200):
                if len(seen) > fired:
                    break
                await asyncio.sleep(0.01)
            assert len(seen) > fired
        finally:
            xs.close()

    run_clean(scenario)


@pytest.mark.root
@pytest.mark.daemon
def test_the_first_event_of_many_new_watches_keeps_the_connection(stack: Stack) -> None:
    """xenstored fires each new watch once, right behind its reply: those events are policyd's
    own, so watching more frontends than the bound on foreign events (a thousand exports over
    a hundred domains) keeps the connection."""

    async def scenario() -> None:
        changes: list[bool] = []
        seen: list[str] = []
        xs = XenStore(str(stack.xenstore_path), on_connection_changed=changes.append)
        try:
            count = 2 * WATCH_EVENTS_MAX
            for n in range(count):
                await xs.watch(f"/local/domain/{n + 1}/name", f"frontend-{n + 1}",
                               lambda p, t: seen.append(t))  # fmt: skip
            assert await xs.domain_name(1) == "work"
            for _ in range(200):
                if len(seen) >= count:
                    break
                await asyncio.sleep(0.01)
            assert changes == [True]  # connected once, never dropped
            assert sorted(set(seen)) == sorted(f"frontend-{n + 1}" for n in range(count))
        finally:
            xs.close()

    run_clean(scenario)


@pytest.mark.root
@pytest.mark.daemon
def test_real_reconnect_after_oxenstored_restarts(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    stack = stack_factory(StackConfig(domains={"work": 1}, broker=False, policyd=False))
    harness: dict[str, list[str]] = {}

    async def scenario() -> None:
        xs = XenStore(str(stack.xenstore_path))
        try:
            assert await xs.find_domain("work") == 1
            before = Counter(open_fds())
            restart_oxenstored(stack, domains={"work": 5})
            after = Counter(open_fds())  # the daemon's pipes and log, the harness's own client
            harness.update(opened=list((after - before).elements()))
            # the old connection fails (EOF, or EPIPE on the first write), or is already
            # known dead: either way the next operation connects to the new oxenstored
            with contextlib.suppress(XenStoreError):
                await xs.find_domain("work")
            assert await xs.find_domain("work") == 5
            assert xs.connected
        finally:
            xs.close()

    run_clean(scenario, harness)


def restart_oxenstored(stack: Stack, domains: dict[str, int]) -> None:
    """Stop the stack's oxenstored and start a fresh one (an empty store) on the same socket."""
    if stack._xs is not None:
        stack._xs.close()
        stack._xs = None
    problems = stack.daemons.pop("oxenstored").stop(stack.config.stop_timeout_s)
    assert not problems
    stack.config.domains = domains
    stack._start_xenstore()
    # the harness's own pyxs client (used to register the domains) is closed too: its reader
    # thread closes its sockets whenever it ends, which made this test's fd accounting racy
    if stack._xs is not None:
        stack._xs.close()
        stack._xs = None


# -- found in review: malformed error replies, queued deadlines, cancellation -------------------


@pytest.mark.parametrize(
    "payload", [b"\xff\xfe\0", b"EACCES", b"eacces\0", b"E" * 40 + b"\0", b"\0", b"EIO\0x"]
)
def test_an_error_reply_that_is_no_errno_name_drops_at_once(tmp_path: Path, payload: bytes) -> None:
    """Not after the deadline: the waiting request fails with the protocol error right away."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        server.script = on_read(lambda req_id, tx: frame(Op.ERROR, req_id, tx, payload))
        started = asyncio.get_running_loop().time()
        await assert_dropped(xs, server, XenStoreProtocolError, "not an errno name")
        assert asyncio.get_running_loop().time() - started < SHORT_TIMEOUT_S / 2

    hostile(tmp_path, case)


def test_time_waiting_for_the_turn_does_not_count_against_the_commit(tmp_path: Path) -> None:
    """A transaction queued behind a slow operation still gets its whole deadline: a commit
    xenstored answers in time is not CommitUnknown because the queue was long."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        slow_done = asyncio.Event()

        async def slow_body(tx: Tx) -> None:
            await asyncio.sleep(SHORT_TIMEOUT_S * 0.8)  # most of its own budget, then commits
            slow_done.set()

        slow = asyncio.ensure_future(xs.transact(slow_body))
        await asyncio.sleep(0.01)
        await xs.transact(lambda tx: tx.write("/local/domain/0/x", "y"))  # queued behind it
        await slow
        assert slow_done.is_set() and xs.connected

    hostile(tmp_path, case)


@pytest.mark.parametrize(
    "unanswered",
    [(Op.TRANSACTION_START, b"\0"), (Op.TRANSACTION_END, b"T\0")],
    ids=["start", "commit"],
)
def test_a_cancelled_transaction_drops_the_connection(
    tmp_path: Path, unanswered: tuple[int, bytes]
) -> None:
    """Cancelled while its start or its commit is in flight: the connection is dropped (the
    transaction ends in xenstored; for a commit the outcome is unknown) and the cancellation
    goes on to the caller, which keeps its fds (policyd.exports.exporter.Exporter._publish)."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        def silent(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
            return None if (op, payload) == unanswered else NotImplemented

        server.script = silent
        work = asyncio.ensure_future(xs.transact(lambda tx: tx.write("/local/domain/0/x", "y")))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if unanswered in server.requests:
                break
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        assert not xs.connected
        server.script = lambda *_: NotImplemented
        assert await read(xs) == "value"

    hostile(tmp_path, case)


@pytest.mark.parametrize("online", [b"1", None, "EACCES"], ids=["one", "missing", "error"])
def test_pre_detach_removes_nothing_unless_online_reads_0(
    tmp_path: Path, online: bytes | str | None
) -> None:
    """remove_physical_device(if_offline=True): `online` is read in the removals' batch; not
    "0" (or missing) the transaction is rolled back (False), an error reading it is
    Error.XenStore, also rolled back: never committed, so the export stays as it was."""
    be = "/local/domain/0/backend/vbd/1/51712"

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        def answer(op: int, req_id: int, tx_id: int, payload: bytes) -> object:
            if op == Op.READ and payload == f"{be}/online".encode() + b"\0":
                if online is None:
                    return frame(Op.ERROR, req_id, tx_id, b"ENOENT\0")
                if isinstance(online, str):
                    return frame(Op.ERROR, req_id, tx_id, online.encode() + b"\0")
                return frame(op, req_id, tx_id, online)
            return NotImplemented

        server.script = answer
        if online == "EACCES":
            with pytest.raises(XenStoreError):
                await xs.remove_physical_device(be, if_offline=True)
        else:
            assert await xs.remove_physical_device(be, if_offline=True) is False
        ends = [p for op, p in server.requests if op == Op.TRANSACTION_END]
        assert ends == [b"F\0"]  # rolled back, never committed
        server.script = lambda *_: NotImplemented
        assert await xs.remove_physical_device(be, if_offline=True) is False  # "value"

    hostile(tmp_path, case)


def test_events_of_policyds_own_watches_are_handed_on_and_checked(tmp_path: Path) -> None:
    """A watch policyd set gets its events (strictly parsed), also after a reconnect (the
    watch is set again on the new connection); a malformed event drops the connection."""

    async def case(server: HostileXenstored, xs: XenStore) -> None:
        seen: list[tuple[str, str]] = []
        await xs.watch(
            "/local/domain/1/name", "frontend-1", lambda path, token: seen.append((path, token))
        )
        peer = server.peers[-1]
        assert peer.transport is not None
        peer.transport.write(frame(Op.WATCH_EVENT, 0, 0, b"/local/domain/1/name\0frontend-1\0"))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert seen == [("/local/domain/1/name", "frontend-1")]

        peer.transport.write(frame(Op.WATCH_EVENT, 0, 0, b"/local/domain/1/name frontend-1"))
        for _ in range(20):
            await asyncio.sleep(0.005)
        # malformed: dropped; with a watch set the client connects again at once
        assert peer.transport.is_closing() and server.peers[-1] is not peer
        assert await read(xs) == "value"
        assert [op for op, _ in server.requests].count(Op.WATCH) == 2  # set again first

    hostile(tmp_path, case)
