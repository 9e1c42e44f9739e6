"""policyd's XenStore connection: xenstored's unix socket read and written on the event loop.

TRUST LEVEL: unprivileged policyd code, on policyd's event loop. xenstored is trusted for
XenStore's integrity (as libxl trusts it), but its replies are untrusted input, parsed with
bounds: a payload is at most XENSTORE_PAYLOAD_MAX bytes, and a reply must answer a request that
is waiting (its req_id), with that request's operation (or ERROR) and transaction id. Anything
else is a protocol error. A protocol error, EOF or a missed deadline closes the connection and
fails every request waiting on it with XenStoreError; the owner (policyd.xenstore.client's
XsClient) connects again for its next operation.

The protocol is pyxs's: its operation table (pyxs._internal.Op), its packet (header layout,
payload limit), path checks (pyxs.helpers.check_path, in policyd.xenstore.client) and its errno
mapping of ERROR replies (pyxs.helpers.error). Only the transport is ours, on the event loop:
pyxs's own client reads the socket on a thread of its own, and handing replies across threads
costs more than the XenStore work itself (docs/benchmarks.md, "Export").

One connection carries pipelined requests: `request()` sends a batch in one write and returns
when every reply of it has come, in the batch's order (xenstored answers a connection's requests
in order, but replies are matched by req_id, not by position). A WATCH_EVENT (policyd watches
its frontends' name nodes, policyd.exports.frontends) is parsed strictly (path and token, ASCII,
bounded) and handed to `on_watch`, which only notes it; more than WATCH_EVENTS_MAX events
of no watch policyd set, on one connection, is a protocol error.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import TypeAlias, cast

from pyxs._internal import Op, Packet
from pyxs.exceptions import PyXSError
from pyxs.helpers import error

from policyd.errors import XenStoreError

XS_TIMEOUT_S = 5.0  # an operation's deadline; no XenStore operation of ours comes near it
XENSTORE_PAYLOAD_MAX = 4096  # xen/include/public/io/xs_wire.h
HEADER = Packet._struct  # struct xsd_sockmsg {type, req_id, tx_id, len}, native byte order
WATCH_EVENTS_MAX = 64
RECV_BYTES = 65536  # one read; a reply is at most 16 + XENSTORE_PAYLOAD_MAX bytes
REQ_ID_MASK = 0xFFFFFFFF
WATCH_EVENT_RE = re.compile(rb"([!-~]{1,3072})\x00([!-~]{1,64})\x00")  # path NUL token NUL
ERROR_PAYLOAD_RE = re.compile(rb"E[A-Z0-9]{1,15}\x00")  # "EAGAIN\0", as xs_wire.h's table

Reply: TypeAlias = bytes | PyXSError  # a payload, or the error xenstored answered with


class XenStoreProtocolError(XenStoreError):
    """xenstored broke the protocol (Error.XenStore on the bus); the connection was dropped."""


class XenStoreTimeout(XenStoreError):
    """xenstored did not answer by the operation's deadline; the connection was dropped."""


class _Batch:
    """The requests of one request() call; `done` is set when the last reply has come."""

    __slots__ = ("done", "left", "replies")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.replies: list[Reply] = [b""] * count
        self.left = count
        self.done = done


class XsConnection(asyncio.BufferedProtocol):
    """One connection to xenstored. `closed` once it failed or was closed; never reopened.
    Received into one buffer of its own (asyncio's default allocates 256 KiB per read, which
    costs three extra syscalls for each of xenstored's short replies)."""

    def __init__(
        self,
        on_lost: Callable[[XsConnection, XenStoreError], None],
        on_watch: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._on_lost = on_lost
        self._on_watch = on_watch
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._recv = memoryview(bytearray(RECV_BYTES))
        # req_id -> (batch, index in it, op sent, tx_id sent)
        self._waiting: dict[int, tuple[_Batch, int, int, int]] = {}
        self._last_id = 0
        self._watch_events = 0
        self.closed = False

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self, requests: Sequence[tuple[int, bytes]], tx_id: int, deadline: float
    ) -> list[Reply]:
        """Send the requests in one write; their replies, in order, once all have come.

        Raises XenStoreError when the connection is closed already (nothing was sent), fails
        while waiting, or the loop's clock passes `deadline` first (then it is dropped)."""
        transport = self._transport
        if self.closed or transport is None:
            raise XenStoreError("the connection to xenstored is closed")
        # pyxs's Packet checks the operation and the payload's size before anything is sent
        packets = [Packet(op, payload, 0, tx_id) for op, payload in requests]
        loop = asyncio.get_running_loop()
        batch = _Batch(len(packets), loop.create_future())
        frames = []
        for index, packet in enumerate(packets):
            req_id = self._new_id()
            self._waiting[req_id] = (batch, index, packet.op, tx_id)
            frames.append(HEADER.pack(packet.op, req_id, tx_id, packet.size))
            frames.append(packet.payload)
        transport.write(b"".join(frames))
        timer = loop.call_at(deadline, self._deadline_passed, batch)
        try:
            await batch.done
        finally:
            timer.cancel()
        return batch.replies

    def _new_id(self) -> int:
        req_id = (self._last_id + 1) & REQ_ID_MASK
        while req_id in self._waiting:  # only after 2**32 requests on one connection
            req_id = (req_id + 1) & REQ_ID_MASK
        self._last_id = req_id
        return req_id

    def _deadline_passed(self, batch: _Batch) -> None:
        if batch.done.done():  # answered in the same loop iteration the timer fired in
            return
        late = XenStoreTimeout("xenstored did not answer in time; connection dropped")
        self.abort(late)
        if not batch.done.done():  # only if it was no longer waiting (a bug), but never hang
            batch.done.set_exception(late)

    # -- replies ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._recv[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        try:
            self._receive(data)
        except Exception as e:  # never let a reply escape into asyncio's own error handling
            self.abort(XenStoreProtocolError(f"policyd could not parse xenstored's reply ({e})"))

    def _receive(self, data: bytes | memoryview) -> None:
        untrusted = self._buffer
        untrusted += data
        start, available = 0, len(untrusted)
        while available - start >= HEADER.size:
            op, req_id, tx_id, size = HEADER.unpack_from(untrusted, start)
            if size > XENSTORE_PAYLOAD_MAX:
                self.abort(
                    XenStoreProtocolError(
                        f"xenstored sent a {size}-byte payload (at most {XENSTORE_PAYLOAD_MAX})"
                    )
                )
                return
            end = start + HEADER.size + size
            if end > available:
                break
            payload = bytes(untrusted[start + HEADER.size : end])
            start = end
            if not self._deliver(op, req_id, tx_id, payload):
                return
        del untrusted[:start]

    def _deliver(self, op: int, req_id: int, tx_id: int, payload: bytes) -> bool:
        """File one reply with its request; False (connection dropped) if it answers none."""
        if op == Op.WATCH_EVENT and self._on_watch is not None:
            event = WATCH_EVENT_RE.fullmatch(payload)
            if event is None:
                self.abort(XenStoreProtocolError("xenstored sent a malformed watch event"))
                return False
            if self._on_watch(event[1].decode("ascii"), event[2].decode("ascii")):
                return True  # an event of a watch policyd set
        if op == Op.WATCH_EVENT:  # of no watch of policyd's: bounded
            self._watch_events += 1
            if self._watch_events <= WATCH_EVENTS_MAX:
                return True
            self.abort(
                XenStoreProtocolError(
                    f"xenstored sent more than {WATCH_EVENTS_MAX} watch events; policyd sets "
                    "no watches"
                )
            )
            return False
        waiting = self._waiting.get(req_id)  # left in place on a mismatch: failed with the rest
        if waiting is None:
            problem = f"a reply (op {op}) to request {req_id}, which no request is waiting for"
        elif op != waiting[2] and op != Op.ERROR:
            problem = f"a reply of op {op} to request {req_id} of op {waiting[2]}"
        elif tx_id != waiting[3]:
            problem = f"a reply in transaction {tx_id} to request {req_id} in {waiting[3]}"
        elif op == Op.ERROR and not ERROR_PAYLOAD_RE.fullmatch(payload):
            problem = f"an ERROR reply to request {req_id} that is not an errno name"
        else:
            del self._waiting[req_id]
            batch, index = waiting[0], waiting[1]
            # an ERROR payload is an errno name and a NUL ("EAGAIN\0"), checked above
            batch.replies[index] = error(payload[:-1]) if op == Op.ERROR else payload
            batch.left -= 1
            if batch.left == 0 and not batch.done.done():
                batch.done.set_result(None)
            return True
        self.abort(XenStoreProtocolError(f"xenstored sent {problem}"))
        return False

    def eof_received(self) -> bool:
        if self._buffer:
            reason = f"xenstored closed the connection after {len(self._buffer)} bytes of a reply"
        else:
            reason = "xenstored closed the connection"
        self.abort(XenStoreError(reason))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f" ({exc})" if exc is not None else ""
        self.abort(XenStoreError(f"the connection to xenstored was lost{detail}"))

    # -- closing ----------------------------------------------------------------------------------

    def abort(self, reason: XenStoreError) -> None:
        """Drop the connection: every waiting request fails with `reason`'s class and text, and
        the owner learns of it (on_lost). Nothing more is read or sent on this connection."""
        if self._close(reason):
            self._on_lost(self, reason)

    def close(self) -> None:
        """The owner closes the connection (policyd stops); the owner is not called back."""
        self._close(XenStoreError("the connection to xenstored was closed"))

    def _close(self, reason: XenStoreError) -> bool:
        if self.closed:
            return False
        self.closed = True
        if self._transport is not None:
            self._transport.abort()  # the fd is closed on the loop's next iteration
        waiting, self._waiting = self._waiting, {}
        self._buffer.clear()
        for batch, *_ in waiting.values():
            if not batch.done.done():  # a fresh exception each: tracebacks are not shared
                batch.done.set_exception(type(reason)(str(reason)))
        return True
