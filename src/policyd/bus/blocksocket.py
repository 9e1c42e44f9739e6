"""policyd's block socket: the libxl block script's direct path to Manager.Attach and Detach.

Unprivileged policyd code; everything read from a peer is untrusted. A SOCK_SEQPACKET unix
socket (--block-socket PATH; mode 0600, owned by policyd's user, in a directory only that user
may enter) that serves two operations, Attach and Detach, to uid 0 only, through
Service.block_call: the same row of METHODS (access rule, handler, audit, named errors) as the
D-Bus methods, with the caller's uid and pid from SO_PEERCRED instead of the bus daemon. All
else stays on D-Bus, which the script falls back to while this socket is absent. Why: the D-Bus
round trip (connect, SASL, Hello, dbus-daemon's routing both ways, the uid lookup) was about
half of the script's cost per call (docs/architecture.md, "The block script's direct path").

Per connection, in order: the peer's credentials (SO_PEERCRED); a peer that is not uid 0 gets
one AccessDenied reply and is closed, nothing read. Then ONE request packet, within
REQUEST_TIMEOUT_S and at most MAX_REQUEST bytes (parse_request), ONE reply packet
(encode_reply), close. At most MAX_CONNECTIONS connections at once: one beyond them gets a
`busy` reply at once, its request unread, so the script may use D-Bus instead. A connection
closed with its request unread (busy, not uid 0, or policyd stopping with it in the listen
queue) is reported to the peer by the kernel as ECONNRESET, ahead of any queued reply: the
script takes that, too, as "not read" and uses D-Bus; a reply, or a plain end of the
connection, after the request was read is final.

    request:  b"BB1 attach <backend path>" | b"BB1 detach <backend path>"
    reply:    b"BB1 ok" [b" <export object path>"]
              b"BB1 error <org.qubes.BlockBroker1.Error.Name> <message>"  (final)
              b"BB1 busy <org.qubes.BlockBroker1.Error.Busy> <message>"   (nothing was read)

The backend path is only framed here (printable ASCII, no space); the exporter validates it,
as it does Attach's argument on D-Bus.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policyd import audit, errors, logfmt
from policyd.bus import authz

if TYPE_CHECKING:
    from policyd.bus.service import Service

MAGIC = b"BB1"
OPERATIONS = {b"attach": "Attach", b"detach": "Detach"}  # request word -> Manager method
MAX_REQUEST = 512  # "BB1 detach " and a path: libxl's are ~40 bytes, the script's bound 512
MAX_REPLY = 1024  # the script reads replies into a buffer of this size
REQUEST_TIMEOUT_S = 2.0  # the script sends its request right after connecting
MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 128
PRINTABLE_RE = re.compile(rb"[\x20-\x7e]*")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Request:
    """A well-framed request: the Manager method and its (still untrusted) backend path."""

    member: str
    untrusted_path: str

    def encode(self) -> bytes:
        word = next(w for w, m in OPERATIONS.items() if m == self.member)
        return b" ".join((MAGIC, word, self.untrusted_path.encode("ascii")))


def _shown(untrusted: bytes) -> str:
    text = repr(untrusted)
    return text if len(text) <= 64 else text[:64] + "...'"


def parse_request(untrusted: bytes) -> Request:
    """The request in one packet, or InvalidArgument naming what is wrong. Strict: printable
    ASCII, exactly three words separated by single spaces: BB1, attach|detach, a path."""
    expected = "expected b'BB1 attach|detach <backend path>'"
    if not untrusted:
        raise errors.InvalidArgument(f"empty request; {expected}")
    if len(untrusted) > MAX_REQUEST:
        raise errors.InvalidArgument(f"request longer than {MAX_REQUEST} bytes; {expected}")
    if not PRINTABLE_RE.fullmatch(untrusted):
        raise errors.InvalidArgument(f"request {_shown(untrusted)} is not printable ASCII")
    words = untrusted.split(b" ")
    if len(words) != 3 or not all(words):
        raise errors.InvalidArgument(f"request {_shown(untrusted)} is malformed; {expected}")
    magic, word, path = words
    if magic != MAGIC:
        raise errors.InvalidArgument(
            f"request {_shown(untrusted)}: protocol {_shown(magic)} is not BB1; {expected}"
        )
    member = OPERATIONS.get(word)
    if member is None:
        raise errors.InvalidArgument(
            f"request {_shown(untrusted)}: unknown operation {_shown(word)}; {expected}"
        )
    return Request(member, path.decode("ascii"))


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def encode_reply(result: list[Any] | errors.PolicydError, *, busy: bool = False) -> bytes:
    """One reply packet, at most MAX_REPLY bytes of printable ASCII: ok and the method's return
    (an object path, or nothing), or the error's D-Bus name and its message (truncated)."""
    if isinstance(result, errors.PolicydError):
        head = b"BB1 busy " if busy else b"BB1 error "
        reply = head + _printable(f"{result.dbus_name} {result.text}").encode("ascii")
        return reply if len(reply) <= MAX_REPLY else reply[: MAX_REPLY - 3] + b"..."
    if busy:
        raise ValueError("a busy reply carries an error")
    if not result:
        return b"BB1 ok"
    path = result[0]
    if not isinstance(path, str) or not path.isascii() or len(path) > MAX_REPLY - 7:
        raise ValueError(f"not an object path: {path!r:.80}")
    return b"BB1 ok " + path.encode("ascii")


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """The peer's (uid, pid), from the kernel (SO_PEERCRED, taken at connect)."""
    pid, uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return uid, pid


class BlockSocketError(Exception):
    """The block socket cannot be set up (the message says why)."""


class BlockSocket:
    """The listening socket and its connections, served on the running asyncio loop."""

    def __init__(
        self,
        path: Path,
        service: Service,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.service = service
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Bind (replacing a stale socket; anything else at the path is refused), listen, and
        accept on the running loop."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise BlockSocketError(f"--block-socket {self.path} exists and is not a socket")
            os.unlink(self.path)
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        old_umask = os.umask(0o177)  # created 0600: never connectable by others, even briefly
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise BlockSocketError(f"--block-socket {self.path}: {e.strerror}") from e
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(LISTEN_BACKLOG)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_all)

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop accepting (the path goes first, so a script that comes now uses D-Bus), then
        let the calls in progress answer, for at most drain_s."""
        try:
            st = os.lstat(self.path)
            if self._inode == (st.st_dev, st.st_ino):  # ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=drain_s)

    @property
    def connections(self) -> int:
        return len(self._serving)

    def _accept_all(self) -> None:
        """The listening socket is readable: accept what waits (it is non-blocking; one reader
        callback for good, rather than a future and an epoll change per accept)."""
        sock = self._sock
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the connection waits; do not spin
                logfmt.warning("block socket: accept failed", error=e)
                loop.remove_reader(sock.fileno())
                loop.call_later(0.1, self._resume_accepting, sock)
                return
            conn.setblocking(False)
            if len(self._serving) >= self.max_connections:
                self._refuse_busy(conn)
                continue
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    def _resume_accepting(self, sock: socket.socket) -> None:
        if self._sock is sock:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_all)

    def _refuse_busy(self, conn: socket.socket) -> None:
        with conn:
            busy = errors.Busy(
                f"policyd is serving {self.max_connections} block-socket connections; "
                "this request was not read (use D-Bus)"
            )
            _send(conn, encode_reply(busy, busy=True))

    async def _receive(self, conn: socket.socket) -> bytes:
        """The request packet (MAX_REQUEST + 1 bytes at most: a longer one shows). The script
        sends it right after connecting, so it is usually there already: no wait then."""
        try:
            return conn.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            receiving = asyncio.get_running_loop().sock_recv(conn, MAX_REQUEST + 1)
            return await asyncio.wait_for(receiving, self.request_timeout_s)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                await self._exchange(conn)
            except Exception:
                logfmt.error("block socket: connection failed", exc=True)

    async def _exchange(self, conn: socket.socket) -> None:
        uid, pid = peer_credentials(conn)
        peer = audit.Caller(uid, "", pid)
        try:
            authz.require_root(uid, "the block socket", authz.POLKIT_ATTACH)
        except errors.AccessDenied as e:
            _refused(peer, e)
            _send(conn, encode_reply(e))
            return
        try:
            data = await self._receive(conn)
        except TimeoutError:
            late = errors.InvalidArgument(f"no request within {self.request_timeout_s:g} s")
            _refused(peer, late)
            _send(conn, encode_reply(late))
            return
        except OSError as e:
            logfmt.info("block socket: peer gone", pid=pid, error=e)
            return
        try:
            request = parse_request(data)
        except errors.InvalidArgument as e:
            _refused(peer, e)
            _send(conn, encode_reply(e))
            return
        await self.service.block_call(request.member, request.untrusted_path, peer, _replier(conn))


def _replier(conn: socket.socket) -> Callable[[list[Any] | errors.PolicydError], None]:
    def reply(result: list[Any] | errors.PolicydError) -> None:
        _send(conn, encode_reply(result))

    return reply


def _send(conn: socket.socket, packet: bytes) -> None:
    """One packet; a fresh connection's send buffer always has room for it. A peer that is
    gone is only logged."""
    try:
        conn.send(packet, socket.MSG_NOSIGNAL)
    except OSError as e:
        logfmt.info("block socket: reply not delivered", error=e)


def _refused(peer: audit.Caller, e: errors.PolicydError) -> None:
    logfmt.info(
        "call refused", method="block-socket", uid=peer.uid, pid=peer.pid, via="block-socket",
        error=e.name, detail=e.text,
    )  # fmt: skip
