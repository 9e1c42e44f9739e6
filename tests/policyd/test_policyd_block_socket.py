"""policyd's block socket (policyd.bus.blocksocket): the block script's direct path to Attach and
Detach, tested like the D-Bus path. Success does what Manager.Attach/Detach do, errors have the
same D-Bus names; hostile peers (not uid 0, malformed or oversize packets, wrong magic, unknown
operations, paths outside backend/vbd, silence, more connections than the limit) each get one
named error or a `busy` reply, and nothing is attached or leaked (no loop device, no XenStore
node, no fd held by policyd).

Runs as root against the real stack; policyd runs as user blockbroker with --block-socket in a
0700 directory of its own (harness.stack), so user blockbroker passes DAC and only policyd's
uid check stands between it and Attach.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from harness.loops import loops_of
from harness.rawbus import as_user
from harness.stack import Stack, StackConfig
from policydlab import (
    XVDA,
    XVDB,
    Api,
    assert_clean,
    held_block_fds,
    open_fd_count,
    remove_libxl_vbd,
    write_libxl_vbd,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

E = b"org.qubes.BlockBroker1.Error."
NOT_PRE_ATTACHED = {"script": "/etc/xen/scripts/block"}  # policyd pre-attaches only its own
MAX_CONNECTIONS = 64  # policyd.bus.blocksocket.MAX_CONNECTIONS
REQUEST_TIMEOUT_S = 2.0  # policyd.bus.blocksocket.REQUEST_TIMEOUT_S


def connect(stack: Stack) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(15)
    sock.connect(str(stack.block_socket))
    return sock


def request(stack: Stack, packet: bytes) -> bytes:
    """One request packet, its one reply packet; then policyd closes the connection."""
    with connect(stack) as sock:
        sock.send(packet)
        reply = sock.recv(4096)
        assert sock.recv(4096) == b"", "policyd keeps the connection open after its reply"
    return reply


def fd_count_settled(stack: Stack, expected: int, timeout_s: float = 5.0) -> int:
    """policyd's fd count once it is back to `expected` (a closed connection's fd goes when its
    task ends, just after the reply), or what it is at the timeout."""
    end = time.monotonic() + timeout_s
    while (count := open_fd_count(stack)) != expected and time.monotonic() < end:
        time.sleep(0.05)
    return count


def log_lines(stack: Stack, needle: str) -> list[str]:
    text = (stack.stack_dir / "policyd.log").read_text(errors="replace")
    return [line for line in text.splitlines() if needle in line]


def test_socket_is_private(stack: Stack) -> None:
    st = stack.block_socket.lstat()
    assert oct(st.st_mode & 0o777) == "0o600"
    assert stack.block_socket.parent.stat().st_mode & 0o777 == 0o700
    assert st.st_uid == stack.policyd_run_dir.stat().st_uid != 0


def test_attach_and_detach_as_on_dbus(stack: Stack, api: Api) -> None:
    image = stack.make_image("block-socket.img", content=b"DIRECT")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), mode="w", extra=NOT_PRE_ATTACHED)
    reply = request(stack, b"BB1 attach " + be.encode())
    assert reply.startswith(b"BB1 ok /org/qubes/BlockBroker1/export/"), reply
    export = reply.removeprefix(b"BB1 ok ").decode()
    props = api.props(export)
    assert (props["BackendPath"], props["Mode"], props["Source"]) == (be, "w", str(image))
    assert stack.xs_read(f"{be}/hotplug-status") == "connected"
    assert stack.xs_read(f"{be}/physical-device-path") == props["LoopDevice"]
    # idempotent, and libxl's relative path names the same backend, as on D-Bus
    assert request(stack, b"BB1 attach " + be.encode()) == reply
    assert api.ok("Attach", "s", [be]) == export
    relative = be.removeprefix("/local/domain/0/").encode()
    assert request(stack, b"BB1 attach " + relative) == reply
    assert len(held_block_fds(stack)) == 1
    # the audit names the peer by SO_PEERCRED
    assert any("via=block-socket" in line for line in log_lines(stack, "event=audit"))

    assert request(stack, b"BB1 detach " + relative) == b"BB1 ok"
    assert stack.xs_read(f"{be}/physical-device") is None
    gone = request(stack, b"BB1 detach " + be.encode())
    assert gone.startswith(b"BB1 error " + E + b"NotFound "), gone
    assert api.err("Detach", "s", [be]) == "NotFound"  # the same name on D-Bus
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_errors_have_the_dbus_names(stack: Stack, api: Api) -> None:
    """A backend whose params name no file: the same error on both transports."""
    missing = stack.image_dir / "block-socket-missing.img"
    be = write_libxl_vbd(stack, 1, XVDB, str(missing), extra=NOT_PRE_ATTACHED)
    reply = request(stack, b"BB1 attach " + be.encode())
    name = api.err("Attach", "s", [be])
    assert reply.startswith(b"BB1 error " + E + name.encode() + b" "), (reply, name)
    remove_libxl_vbd(stack, be)
    assert_clean(stack)


PEER_SCRIPT = """
import json, socket, sys
out = []
for send_first in (False, True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(15)
    s.connect(sys.argv[1])
    if send_first:
        s.send(bytes.fromhex(sys.argv[2]))
    try:
        out.append([s.recv(4096).hex(), s.recv(4096).hex()])
    except ConnectionResetError:  # closed with the request unread
        out.append(["reset", ""])
    if not send_first:
        try:
            s.send(bytes.fromhex(sys.argv[2]))
            out[-1].append("sent")
        except (BrokenPipeError, ConnectionResetError):
            out[-1].append("not sent")
    s.close()
print(json.dumps(out))
"""


def test_non_root_peer_is_refused_before_its_request_is_read(stack: Stack) -> None:
    """User blockbroker owns the socket (DAC lets it connect); the uid check refuses it."""
    image = stack.make_image("block-socket-nonroot.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), extra=NOT_PRE_ATTACHED)
    before = open_fd_count(stack)
    result = subprocess.run(
        [*as_user("blockbroker"), sys.executable, "-c", PEER_SCRIPT, str(stack.block_socket),
         (b"BB1 attach " + be.encode()).hex()],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (first, after, sent), (reply2, _) = json.loads(result.stdout)
    reply = bytes.fromhex(first)
    assert reply.startswith(b"BB1 error " + E + b"AccessDenied "), reply
    assert b"needs uid 0" in reply and b"the caller is uid " in reply
    assert (after, sent) == ("", "not sent")  # closed
    # a request sent at once is dropped unread (the peer sees the reset) or answered the same
    assert reply2 == "reset" or bytes.fromhex(reply2) == reply, reply2
    assert loops_of(image) == []
    assert stack.xs_read(f"{be}/physical-device") is None
    assert stack.xs_read(f"{be}/hotplug-status") is None
    assert fd_count_settled(stack, before) == before
    assert any("AccessDenied" in line for line in log_lines(stack, "via=block-socket"))
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


BE = b"/local/domain/0/backend/vbd/1/51712"


@pytest.mark.parametrize(
    "packet",
    [
        b"",  # empty packet
        b"BB1 attach " + b"/" * 600,  # oversize (policyd reads at most 513 bytes of it)
        b"BB1 attach " + BE + b"/" * 70000,  # far beyond the limit
        b"BB2 attach " + BE,  # wrong magic
        b"bb1 attach " + BE,
        b"BB1 frobnicate " + BE,  # unknown operation
        b"BB1 Attach " + BE,
        b"BB1 attach",  # no path
        b"BB1 attach ",
        b"BB1  attach " + BE,  # double space
        b"BB1 attach " + BE + b" extra",
        b"BB1 attach " + BE + b"\n",  # not printable
        b"BB1 attach " + BE + b"\x00",
        b"BB1 attach " + BE.replace(b"/1/", b"/\xc3\xa9/"),  # not ASCII
        b"BB1 attach /local/domain/0/backend/vif/1/0",  # outside backend/vbd
        b"BB1 attach /local/domain/0/backend/vbd/1/0",  # not a disk devid
        b"BB1 detach /etc/passwd",
        b"BB1 attach backend/vbd/1/51712/../../../1/51728",
        b"BB1 attach /local/domain/7/backend/vbd/1/51712",  # another backend domain
        b"\x00" * 64,
        b"AUTH EXTERNAL 30\r\n",  # a D-Bus client at the wrong socket
    ],
    ids=lambda p: repr(p[:40]) + (f"+{len(p) - 40}" if len(p) > 40 else ""),
)
def test_malformed_requests_are_named_errors(stack: Stack, packet: bytes) -> None:
    before = open_fd_count(stack)
    reply = request(stack, packet)
    assert reply.startswith(b"BB1 error " + E + b"InvalidArgument "), reply
    assert len(reply) <= 1024 and all(0x20 <= b < 0x7F for b in reply)
    assert fd_count_settled(stack, before) == before
    assert_clean(stack)


def test_silent_client_is_closed_and_others_are_served(stack: Stack, api: Api) -> None:
    before = open_fd_count(stack)
    silent = connect(stack)
    started = time.monotonic()
    image = stack.make_image("block-socket-silent.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), extra=NOT_PRE_ATTACHED)
    assert request(stack, b"BB1 attach " + be.encode()).startswith(b"BB1 ok ")
    assert request(stack, b"BB1 detach " + be.encode()) == b"BB1 ok"
    assert time.monotonic() - started < REQUEST_TIMEOUT_S  # served while the silent one waits
    reply = silent.recv(4096)
    waited = time.monotonic() - started
    assert reply.startswith(b"BB1 error " + E + b"InvalidArgument no request within"), reply
    assert silent.recv(4096) == b""
    assert REQUEST_TIMEOUT_S - 0.5 < waited < REQUEST_TIMEOUT_S + 3
    silent.close()
    assert fd_count_settled(stack, before) == before
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_connections_beyond_the_limit_get_busy_unread(stack: Stack) -> None:
    before = open_fd_count(stack)
    image = stack.make_image("block-socket-busy.img")
    be = write_libxl_vbd(stack, 1, XVDA, str(image), extra=NOT_PRE_ATTACHED)
    held = [connect(stack) for _ in range(MAX_CONNECTIONS)]
    try:
        # all of them accepted (each holds one fd in policyd) before the next one comes
        assert fd_count_settled(stack, before + MAX_CONNECTIONS, 1.5) == before + MAX_CONNECTIONS
        for _ in range(3):
            with connect(stack) as sock:  # the reply comes before the request is read
                reply = sock.recv(4096)
                assert reply.startswith(b"BB1 busy " + E + b"Busy "), reply
                assert sock.recv(4096) == b""
            with connect(stack) as sock:  # a request sent at once is dropped unread
                try:
                    sock.send(b"BB1 attach " + be.encode())
                    assert sock.recv(4096).startswith(b"BB1 busy "), "neither busy nor reset"
                except (BrokenPipeError, ConnectionResetError):
                    pass
        assert loops_of(image) == []  # the request was not read, nothing attached
        assert stack.xs_read(f"{be}/physical-device") is None
    finally:
        for sock in held:
            sock.close()
    assert fd_count_settled(stack, before) == before
    # and served again once they are gone
    assert request(stack, b"BB1 attach " + be.encode()).startswith(b"BB1 ok ")
    assert request(stack, b"BB1 detach " + be.encode()) == b"BB1 ok"
    remove_libxl_vbd(stack, be)
    assert_clean(stack, image)


def test_restart_replaces_a_stale_socket(stack: Stack) -> None:
    """policyd unlinks its socket when it stops and replaces a stale one when it starts."""
    stack.stop_policyd()
    assert not stack.block_socket.exists()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(stack.block_socket))  # bound, never listening: ECONNREFUSED
    stale.close()
    stack.start_policyd()
    reply = request(stack, b"BB1 detach " + BE)
    assert reply.startswith(b"BB1 error " + E + b"NotFound "), reply


def test_a_socket_that_cannot_be_made_leaves_dbus_serving(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    """--block-socket in a directory that does not exist: logged, and D-Bus serves Attach."""
    config = StackConfig(
        domains={"work": 1}, policyd_args=["--block-socket", "/nonexistent/dir/block.sock"]
    )
    other = stack_factory(config)
    assert other.has_owner("org.qubes.BlockBroker1")
    assert any("block socket not served" in line for line in log_lines(other, "level="))
    api = Api(other.bus_address)
    try:
        assert api.err("Detach", "s", [BE.decode()]) == "NotFound"
    finally:
        api.close()
