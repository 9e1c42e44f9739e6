"""XenStore transactions and pipelined batches for policyd, on its event loop.

Unprivileged policyd code, on its event loop (policyd.xenstore.connection is the connection
and what it checks of xenstored's replies). XsClient connects lazily and again after a failure;
its operations take turns (one asyncio lock), so policyd's own transactions never conflict
with each other, and each has a deadline
(XS_TIMEOUT_S). Transactions are retried on conflict (EAGAIN at commit), at most
MAX_TX_ATTEMPTS times; a commit whose outcome cannot be known is CommitUnknown.

Tx is one transaction's operations, or plain reads outside any (tx_id 0). A batch sends several
requests at once and then awaits every reply, which xenstored answers in order (what that
saves: docs/benchmarks.md). Batches are at most BATCH_MAX requests, under C xenstored's
default limit on a connection's outstanding requests. Values read are validated here (ASCII,
printable, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from pyxs._internal import NUL, Op
from pyxs.exceptions import PyXSError
from pyxs.helpers import check_path

from policyd import logfmt
from policyd.errors import CommitUnknown, PolicydError, XenStoreError
from policyd.xenstore.connection import XS_TIMEOUT_S, Reply, XenStoreProtocolError, XsConnection

MAX_VALUE_BYTES = 4096
BATCH_MAX = 32
MAX_TX_ATTEMPTS = 16
REARM_FIRST_PAUSE_S = 0.05  # reconnecting after a lost connection, while watches are set
REARM_MAX_PAUSE_S = 2.0
TX_ID_RE = re.compile(rb"[1-9][0-9]{0,9}")  # xenstored's transaction ids: u32, never 0
T = TypeVar("T")
WatchHandler = Callable[[str, str], None]  # (path, token), on the event loop
_ASCII = re.compile(b"^[\x00\x20-\x7f]*$")  # what pyxs itself sends
READ_OPS = frozenset({Op.READ, Op.DIRECTORY})  # all that may go outside a transaction


def _ignore_connected(connected: bool) -> None:
    pass


class Tx:
    """String-typed operations inside one transaction (tx_id), or outside any (tx_id 0: reads
    only, each a consistent value but no snapshot across them), bounded by one deadline."""

    __slots__ = ("_conn", "_deadline", "commit_sent", "tx_id")

    def __init__(self, conn: XsConnection, tx_id: int, deadline: float) -> None:
        self._conn = conn
        self.tx_id = tx_id
        self._deadline = deadline
        # time.monotonic() just before its commit was sent (transact sets it): a commit that
        # succeeds vouches for what the transaction read as of a moment after this
        self.commit_sent = 0.0

    # -- pipelined ----------------------------------------------------------------------------

    async def batch(self, requests: Sequence[tuple[int, bytes]]) -> list[Reply]:
        """Send the requests (BATCH_MAX at a time, each chunk in one write), then collect every
        reply in order: the payload, or the PyXSError xenstored answered with (the caller
        decides which are fatal)."""
        results: list[Reply] = []
        for start in range(0, len(requests), BATCH_MAX):
            chunk = requests[start : start + BATCH_MAX]
            for op, payload in chunk:
                if not _ASCII.match(payload):
                    raise ValueError(payload)
                if not self.tx_id and op not in READ_OPS:
                    raise XenStoreError(f"op {op} outside a transaction: policyd writes in one")
            for reply in await self._conn.request(chunk, self.tx_id, self._deadline):
                results.append(reply if isinstance(reply, PyXSError) else reply.rstrip(NUL))
        return results

    async def read_many(self, paths: Sequence[str]) -> list[str | None]:
        """Each path's validated value, None where it does not exist."""
        requests = [read_request(p) for p in paths]
        return [
            None if _enoent(r) else _text(p, _ok(r))
            for p, r in zip(paths, await self.batch(requests), strict=True)
        ]

    async def exists_many(self, paths: Sequence[str]) -> list[bool]:
        requests = [exists_request(p) for p in paths]
        found = []
        for reply in await self.batch(requests):
            if not _enoent(reply):
                _ok(reply)  # any other error is raised
            found.append(not _enoent(reply))
        return found

    async def run(self, requests: Sequence[tuple[int, bytes]]) -> None:
        """Send requests that answer OK (writes, mkdir, set-perms); the first error is raised."""
        for reply in await self.batch(requests):
            if _ok(reply) != b"OK":
                raise PyXSError(reply)

    async def write_many(self, nodes: Iterable[tuple[str, str]]) -> None:
        await self.run([write_request(p, v) for p, v in nodes])

    # -- one at a time ------------------------------------------------------------------------

    async def read(self, path: str) -> str | None:
        return (await self.read_many([path]))[0]

    async def exists(self, path: str) -> bool:
        return (await self.exists_many([path]))[0]

    async def children(self, path: str) -> list[str]:
        reply = (await self.batch([(Op.DIRECTORY, _path(path) + NUL)]))[0]
        if _enoent(reply):
            return []
        names = _ok(reply)
        return [n.decode("ascii", "replace") for n in names.split(NUL)] if names else []

    async def write(self, path: str, value: str) -> None:
        await self.write_many([(path, value)])

    async def rm_many(self, paths: Sequence[str]) -> None:
        """Remove each path and its children; a path that does not exist is no error."""
        for reply in await self.batch([rm_request(p) for p in paths]):
            if not _enoent(reply):
                _ok(reply)


def write_request(path: str, value: str) -> tuple[int, bytes]:
    return (Op.WRITE, _path(path) + NUL + value.encode("ascii"))


def mkdir_requests(path: str, perms: list[str]) -> list[tuple[int, bytes]]:
    """MKDIR, then SET_PERMS (nodes made below it later inherit these)."""
    raw = _path(path)
    return [
        (Op.MKDIR, raw + NUL),
        (Op.SET_PERMS, raw + NUL + b"".join(p.encode() + NUL for p in perms)),
    ]


def rm_request(path: str) -> tuple[int, bytes]:
    return (Op.RM, _path(path) + NUL)


def read_request(path: str) -> tuple[int, bytes]:
    return (Op.READ, _path(path) + NUL)


def exists_request(path: str) -> tuple[int, bytes]:
    return (Op.DIRECTORY, _path(path) + NUL)


def is_enoent(reply: Reply) -> bool:
    return _enoent(reply)


@functools.lru_cache(maxsize=4096)  # the same few hundred paths again and again; bounded
def _path(path: str) -> bytes:
    raw = path.encode()
    check_path(raw)
    return raw


def _enoent(reply: Reply) -> bool:
    return isinstance(reply, PyXSError) and bool(reply.args) and reply.args[0] == errno.ENOENT


def _ok(reply: Reply) -> bytes:
    if isinstance(reply, PyXSError):
        raise reply
    return reply


class XenStoreValueError(XenStoreError):
    """A value read is malformed (too long, not ASCII, control characters): what the node
    holds is refused, as opposed to XenStore itself failing."""


def _text(path: str, raw: bytes) -> str:
    if len(raw) > MAX_VALUE_BYTES:
        raise XenStoreValueError(f"{path}: value longer than {MAX_VALUE_BYTES} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise XenStoreValueError(f"{path}: value is not ASCII") from None
    if not text.isprintable():
        raise XenStoreValueError(f"{path}: value contains control characters")
    return text


class TxAhead:
    """A transaction started ahead of its body (XsClient.transaction_ahead): its
    TRANSACTION_START is on its way while the caller awaits something else."""

    __slots__ = ("conn", "start", "taken")

    def __init__(self, conn: XsConnection, start: asyncio.Future[list[Reply]]) -> None:
        self.conn = conn
        self.start = start
        self.taken = False  # by transact(), which ends it


class XsClient:
    """One lazily (re)connected XsConnection; operations take turns and each has a deadline."""

    def __init__(
        self,
        socket_path: str,
        timeout_s: float = XS_TIMEOUT_S,
        *,
        on_connection_changed: Callable[[bool], None] = _ignore_connected,
    ) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._conn: XsConnection | None = None
        self._turn = asyncio.Lock()
        # called on the event loop whenever `connected` changes (the Manager's property)
        self._connection_changed = on_connection_changed
        # watches: token -> path, set again on every new connection; each watch's handler
        # gets its events (and one whenever it is set: XenStore fires a new watch once), on
        # the event loop; a handler must only take note, not block
        self.watches: dict[str, str] = {}
        self._handlers: dict[str, WatchHandler] = {}
        self._rearm: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def close(self) -> None:
        self._closed = True
        if self._rearm is not None:
            self._rearm.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _lost(self, conn: XsConnection, reason: XenStoreError) -> None:
        if conn is self._conn:
            self._conn = None
            logfmt.warning("XenStore connection dropped; reconnecting", reason=reason)
            self._connection_changed(False)
            if self.watches and not self._closed and (self._rearm is None or self._rearm.done()):
                self._rearm = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Watches live only as long as their connection (a xenstored restart, a dropped
        connection): connect again at once and set them again, retrying with a growing pause
        until xenstored answers. A watch fires once when it is set, so what changed meanwhile
        is looked at."""
        pause = REARM_FIRST_PAUSE_S
        while self.watches and not self._closed and not self.connected:
            try:
                async with self._turn_taken():
                    await self._connection(self._deadline())
                return
            except XenStoreError as e:
                logfmt.warning("XenStore unreachable; retrying", error=e, retry_in_s=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, REARM_MAX_PAUSE_S)

    async def _connection(self, deadline: float) -> XsConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, new = await loop.create_unix_connection(
                    lambda: XsConnection(self._lost, self._event), self.socket_path
                )
        except (OSError, TimeoutError) as e:
            raise XenStoreError(
                f"cannot connect to xenstored at {self.socket_path} ({str(e) or 'timed out'}); "
                "check that xenstored runs and that --xenstore-path is right"
            ) from None
        if new.closed:  # xenstored hung up at once (_lost ignored it: not current yet)
            raise XenStoreError(f"xenstored at {self.socket_path} closed the connection at once")
        if self.watches:  # watches live as long as their connection: set them again
            replies = await new.request(
                [(Op.WATCH, watch_payload(p, t)) for t, p in self.watches.items()], 0, deadline
            )
            refused = [r for r in replies if isinstance(r, PyXSError)]
            if refused:
                new.abort(XenStoreError(f"xenstored refused a watch: {refused[0]}"))
                raise XenStoreError(f"xenstored refused to set policyd's watches: {refused[0]}")
        self._conn = new
        self._connection_changed(True)
        return new

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout_s

    def _event(self, path: str, token: str) -> bool:
        """A watch event: handed on if it is one of ours (True), else counted by the caller."""
        handler = self._handlers.get(token)
        if handler is None:
            return False
        handler(path, token)
        return True

    async def watch(self, path: str, token: str, handler: WatchHandler) -> None:
        """Watch `path` (and below) under `token`, on this and every later connection;
        `handler(path, token)` gets the events."""
        # the handler first: xenstored fires a new watch once, right behind its reply, and an
        # event no handler takes counts toward the connection's bound on foreign events
        self._handlers[token] = handler
        try:
            await self._set_watch(Op.WATCH, path, token)
        except BaseException:
            if token not in self.watches:
                self._handlers.pop(token, None)
            raise
        self.watches[token] = path

    async def unwatch(self, token: str) -> None:
        path = self.watches.pop(token, None)
        self._handlers.pop(token, None)
        if path is not None:
            await self._set_watch(Op.UNWATCH, path, token)

    async def _set_watch(self, op: int, path: str, token: str) -> None:
        async with self._turn_taken():
            deadline = self._deadline()
            conn = await self._connection(deadline)
            reply = (await conn.request([(op, watch_payload(path, token))], 0, deadline))[0]
        if isinstance(reply, PyXSError) and not (
            op == Op.UNWATCH and reply.args[0] == errno.ENOENT
        ):
            raise XenStoreError(
                f"xenstored refused to {'un' if op == Op.UNWATCH else ''}watch {path}: {reply}"
            )

    @contextlib.asynccontextmanager
    async def _turn_taken(self) -> AsyncIterator[None]:
        """One operation at a time. The wait for the turn is bounded on its own, so that an
        operation's deadline (taken once it has the turn) is not eaten by the queue before it."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._turn.acquire()
        except TimeoutError:
            raise XenStoreError(
                "XenStore is busy: earlier operations did not finish in time; retry"
            ) from None
        try:
            yield
        finally:
            self._turn.release()

    async def reads(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        """Run body's reads outside any transaction: pipelined, one round trip per batch, but no
        snapshot across them (each value is read atomically). Only for callers that need none."""
        async with self._turn_taken():
            deadline = self._deadline()
            conn = await self._connection(deadline)
            try:
                return await body(Tx(conn, 0, deadline))
            except (PyXSError, ValueError) as e:  # an error reply; a request pyxs refuses
                raise XenStoreError(f"XenStore operation failed: {e}") from None

    @contextlib.asynccontextmanager
    async def transaction_ahead(self) -> AsyncIterator[TxAhead]:
        """Start a transaction at once, for a transact(body, ahead) inside this context: its
        TRANSACTION_START round trip overlaps what the caller awaits in between (Attach: the
        broker's request). The turn is taken only to send the START: other operations go on
        meanwhile (replies are matched by request id), and transact() takes it again for the
        body and the commit. Not taken by a transact(), the transaction is rolled back on the
        way out (one request on its connection, outside the turn: it touches nothing); on a
        cancellation or a bug, the connection is dropped instead, which ends it."""
        async with self._turn_taken():
            deadline = self._deadline()
            conn = await self._connection(deadline)
            start = asyncio.ensure_future(conn.request([(Op.TRANSACTION_START, NUL)], 0, deadline))
        ahead = TxAhead(conn, start)
        try:
            yield ahead
        except PolicydError:
            if not ahead.taken:
                await self._end_unused(ahead)
            raise
        except BaseException:
            if not ahead.taken:
                _forget(start)
                conn.abort(XenStoreError("a XenStore transaction was abandoned"))
            raise
        if not ahead.taken:
            await self._end_unused(ahead)

    async def _end_unused(self, ahead: TxAhead) -> None:
        ahead.taken = True
        try:
            tx_id = self._started(ahead.conn, (await ahead.start)[0])
        except XenStoreError:
            return  # no transaction (refused, or the connection failed and ended it)
        await self._rollback(ahead.conn, tx_id, self._deadline())

    async def _take_ahead(self, ahead: TxAhead) -> int | None:
        """The ahead transaction's id, or None when its connection failed before anything
        was sent in it (the caller starts a fresh one, on a new connection)."""
        ahead.taken = True
        if ahead.conn.closed:
            _forget(ahead.start)
            return None
        try:
            return self._started(ahead.conn, (await ahead.start)[0])
        except XenStoreError:
            return None  # refused or dropped: nothing of the body was sent in it

    async def transact(self, body: Callable[[Tx], Awaitable[T]], ahead: TxAhead | None = None) -> T:
        """Run body in a transaction; retried when the commit conflicts. Error.XenStore when
        anything fails before the commit is sent; CommitUnknown when the connection fails or
        the commit's deadline passes after it was sent (it may have been applied). Cancelled
        at any point, the connection is dropped, which ends the transaction in xenstored; a
        commit cancelled in flight may have been applied (callers holding fds keep them).
        `ahead` (from transaction_ahead()): the first attempt runs in that transaction, if
        its connection still stands (else in a fresh one)."""
        async with self._turn_taken():
            for _attempt in range(MAX_TX_ATTEMPTS):
                deadline = self._deadline()
                first, ahead = ahead, None  # an ahead transaction serves the first attempt
                tx_id = None
                if first is not None:
                    try:
                        tx_id = await self._take_ahead(first)
                    except BaseException:  # cancelled waiting for its START: end it
                        first.conn.abort(XenStoreError("a XenStore transaction was abandoned"))
                        raise
                conn = first.conn if first is not None and tx_id is not None else None
                if conn is None:
                    conn = await self._connection(deadline)
                try:
                    if tx_id is None:
                        tx_id = await self._start(conn, deadline)
                    tx = Tx(conn, tx_id, deadline)
                    try:
                        result = await body(tx)
                    except PolicydError:
                        await self._rollback(conn, tx.tx_id, deadline)
                        raise
                    except (PyXSError, ValueError) as e:  # an error reply; a refused request
                        await self._rollback(conn, tx.tx_id, deadline)
                        raise XenStoreError(f"XenStore operation failed: {e}") from None
                    # the commit gets a deadline of its own: a slow body must not turn a
                    # commit xenstored answers normally into CommitUnknown
                    tx.commit_sent = time.monotonic()
                    committed = await self._commit(conn, tx.tx_id, self._deadline())
                except PolicydError:
                    raise  # rolled back, or nothing to roll back, or the commit's outcome
                except BaseException:
                    # cancelled, or a bug: dropping the connection ends the transaction
                    conn.abort(XenStoreError("a XenStore transaction was abandoned"))
                    raise
                if committed:
                    return result
        raise XenStoreError(
            f"XenStore transaction conflicted {MAX_TX_ATTEMPTS} times in a row; retry later"
        )

    async def _start(self, conn: XsConnection, deadline: float) -> int:
        return self._started(
            conn, (await conn.request([(Op.TRANSACTION_START, NUL)], 0, deadline))[0]
        )

    def _started(self, conn: XsConnection, reply: Reply) -> int:
        """TRANSACTION_START's reply: the transaction's id (anything else drops `conn`)."""
        if isinstance(reply, PyXSError):
            raise XenStoreError(f"xenstored refused to start a transaction: {reply}")
        untrusted_id = reply.rstrip(NUL)
        if not TX_ID_RE.fullmatch(untrusted_id) or int(untrusted_id) > 0xFFFFFFFF:
            problem = XenStoreProtocolError(
                f"xenstored answered TRANSACTION_START with {untrusted_id[:16]!r}, not a "
                "transaction id (id 0 would put the writes outside any transaction)"
            )
            conn.abort(problem)
            raise problem
        return int(untrusted_id)

    async def _rollback(self, conn: XsConnection, tx_id: int, deadline: float) -> None:
        if conn.closed:
            return  # the transaction ended with the connection
        try:
            reply = (await conn.request([(Op.TRANSACTION_END, b"F" + NUL)], tx_id, deadline))[0]
        except XenStoreError:
            return  # dropped (deadline, EOF): the transaction ended with the connection
        if isinstance(reply, PyXSError):
            conn.abort(XenStoreError(f"xenstored refused to end a transaction: {reply}"))

    async def _commit(self, conn: XsConnection, tx_id: int, deadline: float) -> bool:
        """True: applied. False: conflicted (EAGAIN), not applied. Raises CommitUnknown when
        the outcome cannot be known."""
        if conn.closed:  # nothing was sent; xenstored ended the transaction with the connection
            raise XenStoreError("the connection to xenstored failed before the commit")
        try:
            reply = (await conn.request([(Op.TRANSACTION_END, b"T" + NUL)], tx_id, deadline))[0]
        except XenStoreError as e:
            raise CommitUnknown(
                f"XenStore failed during a commit ({e}); it may have been applied"
            ) from None
        if isinstance(reply, PyXSError) and reply.args and reply.args[0] == errno.EAGAIN:
            return False
        if isinstance(reply, PyXSError) or reply.rstrip(NUL) != b"OK":
            # an error other than a conflict (C xenstored can fail part-way through applying a
            # transaction), or a reply that is not one: drop the connection
            conn.abort(XenStoreError(f"xenstored answered a commit with {reply!r}"))
            raise CommitUnknown(
                f"XenStore failed during a commit ({reply!r}); it may have been applied"
            )
        return True


def _forget(start: asyncio.Future[list[Reply]]) -> None:
    """An ahead START no one will await: cancelled, or its failure taken (no asyncio warning)."""
    if not start.done():
        start.cancel()
    elif not start.cancelled():
        start.exception()


def watch_payload(path: str, token: str) -> bytes:
    return bytes(_path(path) + NUL + token.encode("ascii") + NUL)
