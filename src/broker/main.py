"""blockbroker-broker: the privileged broker process (socket, dispatch table, serve loop).

TRUST LEVEL: runs as root under seccomp and Landlock; all input untrusted. Start-up (config,
socket, root dirfds, /dev/loop-control) happens before the sandbox; afterwards it only serves
requests. One connection is served at a time, from the configured client uid only (SO_PEERCRED);
a newer connection from that uid replaces the current one. Anything malformed, unknown or
oversized, or a wrong number of fds, ends that connection; the broker keeps serving new ones. An
unexpected exception (a bug) stops the broker with status 1: its state is unknown, and the
service manager starts a fresh one.

    blockbroker-broker --config PATH --socket PATH
    blockbroker-broker --config PATH      # socket activation: LISTEN_FDS=1, LISTEN_PID, fd 3
"""

import argparse
import array
import contextlib
import json
import os
import select
import socket
import stat
import struct
from collections.abc import Callable

from broker import protocol, sandbox
from broker.config import ConfigError, check_fail_closed, load_config, root_disk_devices
from broker.ops import Operations, OpError, Result
from broker.protocol import ErrorCode, FrameError, Reply, ReplyKind, Request, RequestKind

# The whole protocol: request kind -> (number of fds that must come with it, handler).
DISPATCH: dict[RequestKind, tuple[int, Callable[[Operations, Request, list[int]], Result]]] = {
    RequestKind.OPEN_BLOCK: (0, Operations.open_block),
    RequestKind.LOOP_FILE: (0, Operations.loop_file),
    RequestKind.IDENTIFY: (1, Operations.identify),
}


def log(event: str, **fields: object) -> None:
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    with contextlib.suppress(OSError):  # logging must never take the broker down
        os.write(2, (" ".join(parts) + "\n").encode("utf-8", "backslashreplace"))


def receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One frame and the fds that came with it; the caller closes the fds."""
    size, fd_space = protocol.MAX_REQUEST + 1, socket.CMSG_SPACE(4 * 4)  # 4 fds: to see too many
    data, ancdata, flags, _ = conn.recvmsg(size, fd_space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        else:
            flags |= socket.MSG_CTRUNC  # any other control message is a violation too
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise FrameError("truncated frame or unexpected control message")
    return data, fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def answer(conn: socket.socket, ops: Operations, request: Request, fds: list[int]) -> None:
    kind = request.kind.name
    try:
        result = DISPATCH[request.kind][1](ops, request, fds)
    except OpError as e:
        log("refused", kind=kind, code=e.code.name, errno=e.errno, reason=e.message)
        result = Result(None, Reply(ReplyKind.ERROR, e.code, e.errno, message=e.message))
    except OSError as e:  # not foreseen by ops: report it, keep the connection
        log("internal_error", kind=kind, errno=e.errno, reason=e.strerror)
        result = Result(None, Reply(ReplyKind.ERROR, ErrorCode.INTERNAL, e.errno or 0))
    else:
        dev, reply = f"{result.reply.major}:{result.reply.minor}", result.reply
        log("served", kind=kind, dev=dev, diskseq=reply.diskseq, retries=result.retries)
    fds_out = [] if result.fd is None else [result.fd]
    fd_msg = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds_out))] if fds_out else []
    try:  # MSG_DONTWAIT: never block on a peer that does not read its replies (EAGAIN ends it)
        conn.sendmsg([protocol.encode_reply(result.reply)], fd_msg, socket.MSG_DONTWAIT)
    finally:
        close_all(fds_out)  # policyd holds the only reference now (or none: AUTOCLEAR)


def serve_one(conn: socket.socket, ops: Operations) -> bool:
    """Serve one frame; False when the connection is over."""
    fds: list[int] = []
    try:
        data, fds = receive(conn)
        if not data and not fds:
            log("connection_end", reason="peer closed")
            return False
        request = protocol.parse_request(data)
        if len(fds) != DISPATCH[request.kind][0]:
            raise FrameError(f"{request.kind.name} with the wrong number of fds: {len(fds)}")
        answer(conn, ops, request, fds)
        return True
    except FrameError as e:
        log("protocol_violation", reason=str(e))
    except OSError as e:
        log("connection_end", reason=e.strerror)
    finally:
        close_all(fds)
    return False


def accept_client(listener: socket.socket, client_uid: int) -> socket.socket | None:
    try:
        conn, _ = listener.accept()
    except OSError as e:
        log("accept_failed", reason=e.strerror)
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    pid, uid, _gid = struct.unpack("iII", creds)  # struct ucred: pid_t, uid_t, gid_t
    if uid != client_uid:
        log("peer_rejected", pid=pid, uid=uid, expected_uid=client_uid)
        conn.close()
        return None
    log("peer_accepted", pid=pid, uid=uid)
    return conn


def serve(listener: socket.socket, ops: Operations, client_uid: int) -> None:
    conn: socket.socket | None = None
    while True:
        poller = select.poll()  # a new one for each wait: no closed fd number stays registered
        for sock in [listener] if conn is None else [listener, conn]:
            poller.register(sock, select.POLLIN)
        ready = [fd for fd, _events in poller.poll()]
        if listener.fileno() in ready and (new := accept_client(listener, client_uid)):
            if conn is not None:
                log("connection_replaced")
                conn.close()
            conn = new
        elif conn is not None and conn.fileno() in ready and not serve_one(conn, ops):
            conn.close()
            conn = None


def listening_socket(path: str | None, client_uid: int) -> socket.socket:
    if path is None:
        if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
            raise ConfigError("no --socket given and no single socket passed by LISTEN_FDS")
        sock = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
        if (sock.family, sock.type) != (socket.AF_UNIX, socket.SOCK_SEQPACKET):
            raise ConfigError("the activation socket is not an AF_UNIX SOCK_SEQPACKET socket")
        os.set_inheritable(sock.fileno(), False)
        return sock
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    os.umask(0o177)  # the socket is created mode 0600; the broker creates no other file
    sock.bind(path)
    os.chown(path, client_uid, -1, follow_symlinks=False)
    sock.listen(8)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blockbroker-broker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="root-owned TOML config")
    parser.add_argument("--socket", help="SOCK_SEQPACKET socket path (else socket activation)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        ops, landlock = Operations(config, root_disk_devices()), sandbox.landlock_abi()
        check_fail_closed(config, ops.forbidden, landlock)
        listener = listening_socket(args.socket, config.client_uid)
        sandbox.enter(config.file_roots, landlock)
    except (ConfigError, OSError) as e:
        log("startup_failed", reason=str(e))
        return 2
    root_disk = ",".join(f"{os.major(d)}:{os.minor(d)}" for d in sorted(ops.forbidden))
    roots, majors = ",".join(config.file_roots), ",".join(map(str, sorted(config.block_majors)))
    log("ready", pid=os.getpid(), client_uid=config.client_uid, roots=roots, majors=majors,
        root_disk=root_disk, landlock=landlock)  # fmt: skip
    try:
        serve(listener, ops, config.client_uid)
    except KeyboardInterrupt:
        log("stopped")
    except Exception as e:  # a bug: serving on in an unknown state is worse than a restart
        log("fatal", error=type(e).__name__, reason=str(e))
        os._exit(1)
    os._exit(0)  # interpreter teardown would need syscalls the filter kills
