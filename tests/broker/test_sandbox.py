"""The running broker is sandboxed: seccomp filter, no_new_privs, no capabilities, rlimits; and
the same filter kills a process that makes a forbidden syscall."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from brokerlab import Broker

pytestmark = pytest.mark.root


def test_running_broker_is_sandboxed(broker: Broker) -> None:
    broker.assert_serves()  # the requests themselves need none of what is taken away
    assert broker.status("Seccomp") == "2"
    assert broker.status("NoNewPrivs") == "1"
    for capset in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(broker.status(capset), 16) == 0, capset  # docs/broker.md: no capability
    limits = Path(f"/proc/{broker.pid}/limits").read_text()
    for name in ("Max processes", "Max core file size", "Max file size"):
        line = next(line for line in limits.splitlines() if line.startswith(name))
        assert line.split()[-3:-1] == ["0", "0"], line  # stderr is a pipe here, so FSIZE=0


def test_stop_and_continue_survives(broker: Broker) -> None:
    """SIGSTOP + SIGCONT (a debugger, `kill -STOP`) must never kill the broker."""
    os.kill(broker.pid, signal.SIGSTOP)
    os.kill(broker.pid, signal.SIGCONT)
    broker.assert_serves()
    assert broker.proc.poll() is None
    assert broker.status("Seccomp") == "2"


def test_stopped_timed_wait_resumes_under_filter() -> None:
    """A wait with a relative timeout (poll, futex) that is stopped and continued is resumed by
    the kernel with restart_syscall, which the filter must allow."""
    script = "import os, select\nfrom broker import sandbox\nsandbox.build_filter().load()\n"
    script += "os.write(1, b'loaded\\n')\nselect.poll().poll(1000)\n"
    script += "os.write(1, b'survived\\n')\nos._exit(0)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "loaded\n"
    time.sleep(0.2)  # inside poll() by now
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdout.read() == "survived\n"
    assert proc.wait(timeout=30) == 0


def run_under_filter(body: str) -> subprocess.CompletedProcess[str]:
    """Runs `body` in a fresh interpreter after loading exactly the broker's filter."""
    script = "import os, socket, fcntl, errno\nfrom broker import sandbox\n"
    script += "sandbox.build_filter().load()\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    "body",
    [
        "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
        "os.execv('/bin/true', ['true'])",
        "os.fork()",
        "os.kill(os.getppid(), 0)",
        "os.mkdir('/tmp/blockbroker-never')",
        "fcntl.ioctl(0, 0x5401, bytearray(64))",  # TCGETS: an ioctl not on the list
        "os.setuid(0)",
    ],
)
def test_forbidden_syscall_kills(body: str) -> None:
    result = run_under_filter(f"os.write(1, b'loaded\\n')\n{body}\nos.write(1, b'survived\\n')")
    assert result.stdout == "loaded\n", result.stderr
    assert result.returncode == -signal.SIGSYS


def test_file_creation_probe_gets_an_errno(tmp_path: Path) -> None:
    target = tmp_path / "created"
    keep = tmp_path / "keep"
    keep.write_text("data")
    body = f"""
    cases = [
        ({str(target)!r}, os.O_CREAT | os.O_WRONLY),
        ({str(keep)!r}, os.O_TRUNC | os.O_WRONLY),
        ({str(tmp_path)!r}, os.O_TMPFILE | os.O_RDWR),
    ]
    for path, flags in cases:
        try:
            os.open(path, flags, 0o600)
        except OSError as e:
            assert e.errno == errno.EACCES, e
        else:
            raise SystemExit("opened")
    os.write(1, b"refused\\n")
    os._exit(0)
    """
    result = run_under_filter(body)
    assert (result.returncode, result.stdout) == (0, "refused\n"), result.stderr
    assert not target.exists()
    assert keep.read_text() == "data"
