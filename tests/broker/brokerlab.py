"""Helpers for the broker tests: the real broker as a subprocess, with its own config and root.

Leak checks are scoped to this test's own files (other engineers run loop-device tests on the same
machine): a loop device counts as leaked only if its backing file lies under the test's root.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import loops
from harness.brokerclient import BrokerClient

BROKER_BIN = Path(sys.executable).with_name("blockbroker-broker")


def bound_loops(root: Path) -> list[str]:
    """Names of the loop devices whose backing file lies under `root`."""
    return [loop.name for loop in loops.loops_under([root])]


def wait_no_loops(root: Path, timeout: float = loops.SETTLE_S) -> list[str]:
    """Waits (bounded) for AUTOCLEAR to release every loop device backed below `root`; the
    names of those left."""
    return [loop.name for loop in loops.leaked_loops([root], timeout)]


def write_config(path: Path, client_user: str | int, roots: list[Path], majors: list[int]) -> Path:
    user = f'"{client_user}"' if isinstance(client_user, str) else str(client_user)
    path.write_text(
        f"client_user = {user}\n"
        f"file_roots = [{', '.join(repr(str(r)) for r in roots)}]\n"
        f"block_majors = [{', '.join(map(str, majors))}]\n".replace("'", '"')
    )
    path.chmod(0o644)
    return path


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    root: Path
    log_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return loops.fd_count(self.pid)

    def status(self, key: str) -> str:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
        raise KeyError(key)

    def client(self) -> BrokerClient:
        return BrokerClient(str(self.socket_path))

    def raw(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(str(self.socket_path))
        return sock

    def wait_log(self, fragment: str, timeout: float = 5.0) -> bool:
        """True once a log line containing `fragment` has arrived (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(fragment in line for line in list(self.log_lines)):
                return True
            time.sleep(0.01)
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_serves(self) -> None:
        """The broker is alive and answers a real request on a new connection."""
        assert self.alive(), f"broker died: {self.proc.returncode}; log: {self.log_lines[-5:]}"
        client = self.client()
        try:
            image = self.root / "serves-probe.img"
            if not image.exists():
                image.write_bytes(b"\0" * 65536)
            fd, _ = client.loop_file(str(image), writable=False)
            os.close(fd)
        finally:
            client.close()


def start_broker(
    config: Path, socket_path: Path, root: Path, wrapper: tuple[str, ...] = ()
) -> Broker:
    """The broker, ready; `wrapper` is a command that runs it (the broker's argv follows)."""
    proc = subprocess.Popen(
        [*wrapper, str(BROKER_BIN), "--config", str(config), "--socket", str(socket_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    broker = Broker(proc, socket_path, root)
    assert proc.stderr is not None
    stderr = proc.stderr

    def drain() -> None:
        for line in stderr:
            broker.log_lines.append(line.decode(errors="replace").rstrip())

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited {proc.returncode}: {broker.log_lines}")
        if any(line.startswith("event=ready") for line in broker.log_lines):
            return broker
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError("broker did not become ready")


def stop_broker(broker: Broker) -> None:
    if broker.alive():
        broker.proc.terminate()
    broker.proc.wait(timeout=10)


def make_image(path: Path, size: int = 1 << 20, fill: bytes = b"\0") -> Path:
    with open(path, "wb") as f:
        f.write(fill * size if len(fill) == 1 else fill)
        f.truncate(size)
    return path


def settled_fd_count(broker: Broker, expected: int, timeout: float = 5.0) -> int:
    """The broker's fd count once it equals `expected` (or the last count after `timeout`):
    the broker closes a sent fd just after the reply, so the count settles a moment later."""
    return loops.settled_fd_count(broker.pid, expected, timeout)


def exchange_raw(broker: Broker, frame: bytes, fds: list[int] | None = None) -> bytes:
    """Sends one raw frame (with fds) on a new connection; returns the reply, b"" on EOF."""
    sock = broker.raw()
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([frame], ancillary)
        data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in ancdata:  # never keep an fd from a reply here
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        return data
    finally:
        sock.close()
