"""policyd.exports.fdstore without systemd: LISTEN_* parsing (hostile values), the wire bytes.

Unit tests, unprivileged. A datagram socket bound by the test stands in for systemd's notify
socket only to check the byte format; tests/stack/test_systemd_manager.py runs the real thing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.exports import fdstore
from policyd.exports.fdstore import FdStore, ListenFdsError, NotifySocketError, take_listen_fds

ME = str(os.getpid())


def env(pid: str = ME, fds: str | None = "2", names: str | None = None) -> dict[str, str]:
    e = {"LISTEN_PID": pid, "OTHER": "kept"}
    if fds is not None:
        e["LISTEN_FDS"] = fds
    if names is not None:
        e["LISTEN_FDNAMES"] = names
    return e


@pytest.mark.parametrize(
    "hostile",
    [
        env(fds="-1"),
        env(fds="+2"),
        env(fds=" 2"),
        env(fds="2 "),
        env(fds="0x2"),
        env(fds="02"),
        env(fds="2_0"),
        env(fds="٢"),  # an Arabic-Indic digit: str.isdigit() and int() accept it
        env(fds=""),
        env(fds="99999999999999999999"),
        env(fds=str(fdstore.LISTEN_FDS_MAX + 1)),
        env(pid="+" + ME),
        env(pid=""),
        env(pid="abc"),
        env(fds=None),
        {"LISTEN_FDS": "1"},
        {"LISTEN_FDNAMES": "x"},
        env(fds="1", names="a:b"),
        env(fds="1", names="bad\nname"),
        env(fds="1", names="caf\u00e9"),
        env(fds="1", names="x" * 256),
    ],
)
def test_malformed_listen_variables_raise_and_are_removed(hostile: dict[str, str]) -> None:
    with pytest.raises(ListenFdsError):
        take_listen_fds(hostile)
    assert hostile.keys() <= {"OTHER"}


def test_listen_pid_of_another_process_gives_no_fds_and_clears_the_variables() -> None:
    e = env(pid=str(os.getpid() + 1), names="a:b")
    assert take_listen_fds(e) == []
    assert e == {"OTHER": "kept"}


def test_no_listen_variables_gives_no_fds() -> None:
    e = {"OTHER": "kept"}
    assert take_listen_fds(e) == []
    assert e == {"OTHER": "kept"}


def test_zero_fds_with_empty_names_is_no_fds() -> None:
    assert take_listen_fds(env(fds="0", names="")) == []


def test_valid_fdname_is_systemds_rule() -> None:
    assert fdstore.valid_fdname("")
    assert fdstore.valid_fdname(" ")
    assert fdstore.valid_fdname("vbd-5-768 ~!")
    assert fdstore.valid_fdname("x" * 255)
    assert not fdstore.valid_fdname("x" * 256)
    assert not fdstore.valid_fdname("a:b")
    assert not fdstore.valid_fdname("a\tb")
    assert not fdstore.valid_fdname("a\x7fb")
    assert not fdstore.valid_fdname("caf\u00e9")


CHILD = """
import json, os, sys, fcntl
from policyd.exports.fdstore import take_listen_fds, ListenFdsError
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = sys.argv[1]
if sys.argv[2] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
try:
    fds = take_listen_fds()
except ListenFdsError as e:
    print(json.dumps({"error": str(e), "env": [k for k in os.environ if k.startswith("LISTEN_")]}))
    sys.exit(0)
print(json.dumps({
    "fds": fds,
    "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd, _ in fds],
    "content": [os.read(fd, 100).decode() for fd, _ in fds],
    "env": [k for k in os.environ if k.startswith("LISTEN_")],
}))
"""


def run_child(count: str, names: str, contents: list[bytes]) -> dict[str, object]:
    """Run CHILD with one pipe per content at fds 3, 4, … (inheritable, as systemd passes them)."""
    pipes = []
    for content in contents:
        r, w = os.pipe()
        os.write(w, content)
        os.close(w)
        pipes.append(r)

    def arrange() -> None:
        # dup to high numbers first so that placing them at 3.. cannot clobber a source
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in pipes]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)  # dup2's copy is inheritable

    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, count, names],
            preexec_fn=arrange,
            close_fds=False,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for fd in pipes:
            os.close(fd)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_passed_fds_are_taken_with_names_cloexec_and_variables_removed() -> None:
    out = run_child("2", "vbd-5-768:second", [b"one", b"two"])
    assert out == {
        "fds": [[3, "vbd-5-768"], [4, "second"]],
        "cloexec": [True, True],
        "content": ["one", "two"],
        "env": [],
    }


def test_missing_names_are_unknown() -> None:
    assert run_child("2", "-", [b"a", b"b"])["fds"] == [[3, "unknown"], [4, "unknown"]]
    assert run_child("2", "only", [b"a", b"b"])["fds"] == [[3, "only"], [4, "unknown"]]


def test_more_fds_claimed_than_open_is_an_error() -> None:
    out = run_child("40", "-", [b"a"])
    assert "fd 4 is not open" in str(out["error"])
    assert out["env"] == []


# ---- the notify socket's wire format -------------------------------------------------------


@pytest.fixture
def fake_notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket (byte format only)."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 8192, 16)
    return data, fds


def test_push_sends_fdstore_and_name_with_the_fd(fake_notify: tuple[socket.socket, str]) -> None:
    sock, path = fake_notify
    r, w = os.pipe()
    try:
        FdStore(path).push(r, "vbd-5-768")
        data, fds = receive(sock)
        assert data == b"FDSTORE=1\nFDNAME=vbd-5-768"
        assert len(fds) == 1
        assert os.path.sameopenfile(fds[0], r)
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_remove_and_notify_send_plain_text(fake_notify: tuple[socket.socket, str]) -> None:
    sock, path = fake_notify
    store = FdStore(path)
    store.remove("vbd-5-768")
    assert receive(sock) == (b"FDSTOREREMOVE=1\nFDNAME=vbd-5-768", [])
    store.notify("READY=1\nSTATUS=serving")
    assert receive(sock) == (b"READY=1\nSTATUS=serving", [])


def test_abstract_notify_socket() -> None:
    name = f"blockbroker-fdstore-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        FdStore("@" + name).notify("READY=1")
        assert receive(sock) == (b"READY=1", [])


@pytest.mark.parametrize("bad", ["a:b", "x" * 256, "nl\n", "caf\u00e9"])
def test_invalid_names_raise_value_error_and_send_nothing(
    fake_notify: tuple[socket.socket, str], bad: str
) -> None:
    sock, path = fake_notify
    store = FdStore(path)
    with pytest.raises(ValueError, match="invalid fd store name"):
        store.push(0, bad)
    with pytest.raises(ValueError, match="invalid fd store name"):
        store.remove(bad)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)


def test_send_failure_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        FdStore(str(tmp_path / "nobody-listens")).notify("READY=1")


def test_without_notify_socket_the_store_is_unavailable_and_sends_nothing() -> None:
    store = FdStore.from_environ({})
    assert not store.available
    store.push(0, "x")
    store.remove("x")
    store.notify("READY=1")
    assert FdStore.from_environ({"NOTIFY_SOCKET": "/run/x"}).available


@pytest.mark.parametrize("bad", ["relative/path", "@", "x"])
def test_malformed_notify_socket_is_a_named_error(bad: str) -> None:
    with pytest.raises(NotifySocketError):
        FdStore(bad)


def test_oversized_notification_is_refused(fake_notify: tuple[socket.socket, str]) -> None:
    _sock, path = fake_notify
    with pytest.raises(ValueError, match="over"):
        FdStore(path).notify("STATUS=" + "x" * fdstore.NOTIFY_MAX)
