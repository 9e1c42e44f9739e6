"""systemd's fd store with a real loop device, against a real systemd 252 user manager.

Runs as root with a real `systemd --user` (tests/harness/systemd.py) and real loop devices. The
test service runs as user blockbroker (User= works in a root user manager) and uses
policyd.exports.fdstore as policyd will: take_listen_fds() at start, FdStore.push()/remove().
It gets its loop fd the way policyd does, over a unix socket from a root process (the test,
standing in for the broker), which attaches the image with LOOP_CONFIGURE and AUTOCLEAR.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.stack import Stack, StackConfig
from harness.systemd import UserManager

from broker import kernel

pytestmark = [pytest.mark.root, pytest.mark.daemon]

UNIT = "fdstore-test.service"
NAME = "vbd-5-768 loop"  # a space is a valid fd name

SERVICE = r"""
import json, os, signal, socket, sys, time
from policyd.exports.fdstore import FdStore, take_listen_fds

out = open(sys.argv[1], "a", buffering=1)
def say(**kw):
    out.write(json.dumps({"pid": os.getpid(), "uid": os.getuid(), **kw}) + "\n")

received = take_listen_fds()
store = FdStore()
held = {}
for fd, name in received:
    st = os.fstat(fd)
    held[name] = fd
    say(event="received", name=name, rdev=st.st_rdev, fd=fd)
if not received:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(sys.argv[2])
        _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
    store.push(fds[0], sys.argv[3])
    held[sys.argv[3]] = fds[0]
    say(event="pushed", name=sys.argv[3], rdev=os.fstat(fds[0]).st_rdev)

def remove(_sig, _frame):
    for name, fd in list(held.items()):
        store.remove(name)
        os.close(fd)
        del held[name]
    say(event="removed")
signal.signal(signal.SIGUSR1, remove)
store.notify("READY=1\nSTATUS=holding " + ",".join(held))
while True:
    signal.pause()
"""


def unit_text(venv: Path, script: Path, out: Path, server: Path) -> str:
    return f"""[Unit]
Description=fd store test service
StartLimitIntervalSec=0

[Service]
Type=notify
User=blockbroker
Group=blockbroker
ExecStart={venv}/bin/python {script} {out} {server} "{NAME}"
Restart=on-failure
RestartSec=50ms
FileDescriptorStoreMax=4
"""


class LoopServer:
    """Root stand-in for the broker: each connection gets a fresh read-only AUTOCLEAR loop fd
    for `image` (LOOP_CONFIGURE via /dev/loop-control); the server keeps no copy."""

    def __init__(self, path: Path, image: Path) -> None:
        self.path = path
        self.image = image
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        path.chmod(0o777)
        self.listener.listen(4)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                with conn:
                    loop_fd = attach(self.image)
                    try:
                        socket.send_fds(conn, [b"L"], [loop_fd])
                    finally:
                        os.close(loop_fd)
            except BaseException as e:  # reported by the test, not lost in the thread
                self.errors.append(e)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


def attach(image: Path) -> int:
    """A read-only AUTOCLEAR loop device over `image`; returns its fd."""
    backing = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open("/dev/loop-control", "rb", buffering=0) as ctl:
            for _ in range(20):
                n = fcntl.ioctl(ctl.fileno(), kernel.LOOP_CTL_GET_FREE)
                loop_fd = os.open(f"/dev/loop{n}", os.O_RDONLY | os.O_CLOEXEC)
                config = kernel.loop_config()
                config.fd = backing
                config.info.lo_flags = kernel.LO_FLAGS_READ_ONLY | kernel.LO_FLAGS_AUTOCLEAR
                try:
                    fcntl.ioctl(loop_fd, kernel.LOOP_CONFIGURE, config)
                    return loop_fd
                except OSError as e:
                    os.close(loop_fd)
                    if e.errno != errno.EBUSY:  # another engineer's attach won the race
                        raise
        raise OSError(errno.EBUSY, "no free loop device after 20 tries")
    finally:
        os.close(backing)


def loop_name(rdev: int) -> str:
    return f"loop{os.minor(rdev)}"


def backing_file(rdev: int) -> str | None:
    try:
        return Path(f"/sys/block/{loop_name(rdev)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def diskseq(rdev: int) -> str:
    return Path(f"/sys/block/{loop_name(rdev)}/diskseq").read_text().strip()


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A dir user blockbroker can reach (pytest's tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="blockbroker-sd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(work_dir: Path) -> Iterator[UserManager]:
    with UserManager(work_dir / "sd") as running:
        yield running


def test_loop_fd_survives_sigkill_and_restart_and_goes_with_remove_and_stop(
    manager: UserManager, work_dir: Path
) -> None:
    work = work_dir / "work"
    work.mkdir()
    work.chmod(0o777)
    image = work / "disk.img"
    image.write_bytes(b"fd store test\n".ljust(1 << 20, b"\0"))
    image.chmod(0o644)
    script = work / "service.py"
    script.write_text(SERVICE)
    script.chmod(0o644)
    out = work / "events.jsonl"
    server = LoopServer(work / "loops.sock", image)
    venv = StackConfig().venv

    def events() -> list[dict[str, object]]:
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines()]

    def events_of(pid: int) -> list[dict[str, object]]:
        return [e for e in events() if e["pid"] == pid]

    def wait_new_main_pid(old: int) -> int:
        wait_until(
            lambda: manager.main_pid(UNIT) not in (0, old) and manager.is_active(UNIT),
            "a new main process",
        )
        return manager.main_pid(UNIT)

    try:
        manager.write_unit(UNIT, unit_text(venv, script, out, work / "loops.sock"))
        manager.daemon_reload()
        took = manager.start(UNIT)
        first = manager.main_pid(UNIT)
        (pushed,) = events_of(first)
        assert pushed["event"] == "pushed" and pushed["uid"] != 0
        rdev = int(str(pushed["rdev"]))
        seq = diskseq(rdev)
        assert backing_file(rdev) == str(image)
        assert manager.show(UNIT, "NFileDescriptorStore") == "1"

        # (a) SIGKILL: Restart=on-failure starts a new main process, which gets the fd back
        manager.kill(UNIT, signal.SIGKILL)
        second = wait_new_main_pid(first)
        assert events_of(second) == [
            {"pid": second, "uid": pushed["uid"], "event": "received", "name": NAME,
             "rdev": rdev, "fd": 3}
        ]  # fmt: skip
        assert backing_file(rdev) == str(image) and diskseq(rdev) == seq

        # (b) systemctl restart keeps it too
        manager.restart(UNIT)
        third = manager.main_pid(UNIT)
        assert third != second
        assert [(e["event"], e["name"], e["rdev"]) for e in events_of(third)] == [
            ("received", NAME, rdev)
        ]
        assert backing_file(rdev) == str(image) and diskseq(rdev) == seq

        # (c) FDSTOREREMOVE: the store drops it; the service closes its copy; AUTOCLEAR frees it
        manager.kill(UNIT, signal.SIGUSR1)
        wait_until(lambda: manager.show(UNIT, "NFileDescriptorStore") == "0", "an empty store")
        wait_until(lambda: backing_file(rdev) is None or diskseq(rdev) != seq, "loop freed")

        # (d) a restart now passes nothing; the new process gets a new loop fd and pushes it
        manager.restart(UNIT)
        fourth = manager.main_pid(UNIT)
        (repushed,) = events_of(fourth)
        assert repushed["event"] == "pushed"
        rdev2 = int(str(repushed["rdev"]))
        seq2 = diskseq(rdev2)

        # (e) stop + start flushes the store: the fd is closed at stop, the loop freed
        manager.stop(UNIT)
        assert manager.show(UNIT, "NFileDescriptorStore") == "0"
        wait_until(lambda: backing_file(rdev2) is None or diskseq(rdev2) != seq2, "loop freed")
        manager.start(UNIT)
        fifth = manager.main_pid(UNIT)
        assert [e["event"] for e in events_of(fifth)] == ["pushed"]
        assert server.errors == []
        print(
            f"manager start {manager.started_s * 1e3:.0f} ms, first unit start {took * 1e3:.0f} ms"
        )
    finally:
        manager.systemctl("stop", UNIT, check=False)
        server.close()
    final = [e for e in events() if e["event"] == "pushed"][-1]
    wait_until(lambda: backing_file(int(str(final["rdev"]))) != str(image), "last loop freed")


def test_stack_under_systemd_exports_and_policyd_comes_back_after_sigkill(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    stack = stack_factory(StackConfig(domains={"work": 1}, systemd=True))
    assert stack.manager is not None
    unit = stack.POLICYD_UNIT
    assert stack.systemctl("is-active", unit).stdout.strip() == "active"
    image = stack.make_image("systemd-stack.img", 1 << 20, b"under systemd\n")

    def export() -> dict[str, Any]:
        done = stack.run(["blockbroker", "export", str(image), "--to", "work", "--json"])
        assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
        (exported,) = [json.loads(line) for line in done.stdout.splitlines()]
        return exported

    first = export()
    assert backing_file(os.stat(first["loop_device"]).st_rdev) == str(image)
    assert stack.systemctl("is-active", "blockbroker-broker.service").stdout.strip() == "active"

    old = stack.manager.main_pid(unit)
    stack.manager.kill(unit, signal.SIGKILL)
    wait_until(
        lambda: (
            stack.manager is not None
            and stack.manager.main_pid(unit) not in (0, old)
            and stack.manager.is_active(unit)
        ),
        "policyd back under a new main pid",
    )
    assert stack.has_owner("org.qubes.BlockBroker1")
    # a new export after the restart works (what survives is tests/stack/test_policyd_restart.py)
    second = export()
    done = stack.run(["blockbroker", "detach", second["export"]])
    assert done.returncode == 0, done.stderr
    # the export made before the kill: its nodes go; teardown finds no leak
    stack.xs_rm(first["backend_path"])
