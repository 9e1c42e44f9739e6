"""blockbroker-broker: the privileged broker process (socket, dispatch table, serve loop).

TRUST LEVEL: runs as root under seccomp; all input untrusted. Start-up (config, socket, root
dirfds, /dev/loop-control) happens before the sandbox; afterwards it only serves requests. One
connection is served at a time, from the configured client uid only (SO_PEERCRED); a newer
connection from that uid replaces the current one. Anything malformed, unknown or oversized, or
a wrong number of fds, ends that connection; the broker keeps serving new ones.

    blockbroker-broker --config PATH --socket PATH
    blockbroker-broker --config PATH      # socket activation: LISTEN_FDS=1, LISTEN_PID, fd 3
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import select
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from broker import protocol, sandbox
from broker.config import ConfigError, load_config, root_disk_devices
from broker.ops import Opened, Operations, OpError
from broker.protocol import ErrorCode, Reply, ReplyKind, Request, RequestFlag, RequestKind

MAX_FDS_ACCEPTED = 4  # room to notice (and close) too many fds
LISTEN_FD = 3


def log(event: str, **fields: object) -> None:
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    with contextlib.suppress(OSError):  # logging must never take the broker down
        os.write(2, (" ".join(parts) + "\n").encode("utf-8", "backslashreplace"))


class ProtocolViolation(Exception):
    """The peer broke the protocol; the connection ends."""


@dataclass(frozen=True)
class Handler:
    fds: int  # exactly this many fds must come with the request
    run: Callable[[Operations, Request, list[int]], Opened | Reply]


def handle_open_block(ops: Operations, req: Request, fds: list[int]) -> Opened | Reply:
    expect_dev = (
        (req.expect_major, req.expect_minor) if req.flags & RequestFlag.EXPECT_DEV else None
    )
    expect_seq = req.expect_diskseq if req.flags & RequestFlag.EXPECT_DISKSEQ else None
    return ops.open_block(req.path, bool(req.flags & RequestFlag.WRITABLE), expect_dev, expect_seq)


def handle_loop_file(ops: Operations, req: Request, fds: list[int]) -> Opened | Reply:
    writable = bool(req.flags & RequestFlag.WRITABLE)
    direct_io = bool(req.flags & RequestFlag.DIRECT_IO)
    return ops.loop_file(req.path, writable, direct_io, req.block_size)


def handle_identify(ops: Operations, req: Request, fds: list[int]) -> Opened | Reply:
    return ops.identify(fds[0])


DISPATCH: dict[RequestKind, Handler] = {
    RequestKind.OPEN_BLOCK: Handler(0, handle_open_block),
    RequestKind.LOOP_FILE: Handler(0, handle_loop_file),
    RequestKind.IDENTIFY: Handler(1, handle_identify),
}


def receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One frame and the fds that came with it. The caller closes the fds."""
    data, ancdata, flags, _ = conn.recvmsg(
        protocol.MAX_REQUEST + 1,
        socket.CMSG_SPACE(MAX_FDS_ACCEPTED * 4),
        socket.MSG_CMSG_CLOEXEC,
    )
    fds: list[int] = []
    foreign = False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
        else:
            foreign = True
    if foreign or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise ProtocolViolation("truncated frame or unexpected control message")
    return data, fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def serve_request(conn: socket.socket, ops: Operations, data: bytes, fds: list[int]) -> None:
    try:
        request = protocol.parse_request(data)
    except protocol.FrameError as e:
        raise ProtocolViolation(str(e)) from None
    handler = DISPATCH[request.kind]
    if len(fds) != handler.fds:
        raise ProtocolViolation(f"{request.kind.name} takes {handler.fds} fds, got {len(fds)}")
    fd: int | None = None
    try:
        result = handler.run(ops, request, fds)
    except OpError as e:
        log("refused", kind=request.kind.name, code=e.code.name, errno=e.errno, reason=e.message)
        reply = Reply(ReplyKind.ERROR, e.code, e.errno, message=e.message)
    except OSError as e:  # not foreseen by ops: report it, keep the connection
        log("internal_error", kind=request.kind.name, errno=e.errno, reason=e.strerror)
        reply = Reply(ReplyKind.ERROR, ErrorCode.INTERNAL, e.errno or 0, message="internal error")
    else:
        fd, reply = (result.fd, result.reply) if isinstance(result, Opened) else (None, result)
        log(
            "served",
            kind=request.kind.name,
            dev=f"{reply.major}:{reply.minor}",
            diskseq=reply.diskseq,
            size=reply.size,
        )
    try:
        ancillary = (
            [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        )
        conn.sendmsg([protocol.encode_reply(reply)], ancillary)
    finally:
        if fd is not None:
            os.close(fd)  # policyd holds the only reference now (or none: AUTOCLEAR frees it)


def serve_one(conn: socket.socket, ops: Operations) -> bool:
    """Serve one frame; False when the connection is over."""
    try:
        data, fds = receive(conn)
    except OSError as e:
        log("connection_end", reason=e.strerror)
        return False
    except ProtocolViolation as e:
        log("protocol_violation", reason=str(e))
        return False
    try:
        if not data and not fds:
            log("connection_end", reason="peer closed")
            return False
        serve_request(conn, ops, data, fds)
        return True
    except ProtocolViolation as e:
        log("protocol_violation", reason=str(e))
        return False
    except OSError as e:
        log("connection_end", reason=e.strerror)
        return False
    except Exception as e:  # a bug: say so, drop the peer, keep the broker serving
        log("internal_error", error=type(e).__name__, reason=str(e))
        return False
    finally:
        close_all(fds)


def accept_client(listener: socket.socket, client_uid: int) -> socket.socket | None:
    try:
        conn, _ = listener.accept()
    except OSError as e:
        log("accept_failed", reason=e.strerror)
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid != client_uid:
        log("peer_rejected", pid=pid, uid=uid, expected_uid=client_uid)
        conn.close()
        return None
    log("peer_accepted", pid=pid, uid=uid)
    return conn


def serve(listener: socket.socket, ops: Operations, client_uid: int) -> None:
    conn: socket.socket | None = None
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == listener.fileno():
                new = accept_client(listener, client_uid)
                if new is None:
                    continue
                if conn is not None:
                    log("connection_replaced")
                    poller.unregister(conn)
                    conn.close()
                conn = new
                poller.register(conn, select.POLLIN)
            elif conn is not None and fd == conn.fileno() and not serve_one(conn, ops):
                poller.unregister(conn)
                conn.close()
                conn = None
                break  # the fd number may be reused before the next poll


def listening_socket(path: str | None, client_uid: int) -> socket.socket:
    if path is None:
        if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
            raise ConfigError("no --socket given and no single socket passed by LISTEN_FDS")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        sock = socket.socket(fileno=LISTEN_FD)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            raise ConfigError("the activation socket is not an AF_UNIX SOCK_SEQPACKET socket")
        os.set_inheritable(sock.fileno(), False)
        return sock
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chown(path, client_uid, -1, follow_symlinks=False)
    os.chmod(path, 0o600, follow_symlinks=False)
    sock.listen(8)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blockbroker-broker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="root-owned TOML config")
    parser.add_argument("--socket", help="SOCK_SEQPACKET socket path (else socket activation)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        ops = Operations(config, root_disk_devices())
        listener = listening_socket(args.socket, config.client_uid)
        sandbox.enter()
    except (ConfigError, OSError) as e:
        log("startup_failed", reason=str(e))
        return 2
    log(
        "ready",
        pid=os.getpid(),
        client_uid=config.client_uid,
        roots=",".join(config.file_roots),
        majors=",".join(map(str, sorted(config.block_majors))),
        root_disk=",".join(f"{os.major(d)}:{os.minor(d)}" for d in sorted(ops.forbidden)),
    )
    try:
        serve(listener, ops, config.client_uid)
    except KeyboardInterrupt:
        log("stopped")
    os._exit(0)  # interpreter teardown would need syscalls the filter kills


if __name__ == "__main__":
    sys.exit(main())
