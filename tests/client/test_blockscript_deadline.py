"""blockbroker-block's failure path is bounded: a hanging xenstore-write is killed after the
tool deadline, and dies with the script when libxl kills the script (PR_SET_PDEATHSIG), so no
orphaned writer can re-create a backend directory after libxl removed it.

Unit lane, no root. The bus is FakeBus (tests/client/blockscript.py), a stand-in for dbus-daemon
that answers Attach with an error, so the script takes its failure path. The Xen tools are
stand-ins too: the script is built here from the repo's source with TOOL_PATH pointing at a
directory holding a `xenstore-exists` that says yes and a `xenstore-write` that records its pid
and argv, sleeps, and only then would write (it leaves a file if it ever gets that far). Without
gcc this lane skips, and fails under CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from blockscript import FakeBus, build, error_reply, makefile_cflags, run_script

BE = "backend/vbd/1/51712"
REFUSED = error_reply(b"org.qubes.BlockBroker1.Error.Refused", b"not allowed")
HANG_S = 30


def fake_tools(tools: Path) -> Path:
    tools.mkdir()
    exists = tools / "xenstore-exists"
    exists.write_text("#!/bin/sh\nexit 0\n")
    writer = tools / "xenstore-write"
    writer.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        f"here = {str(tools)!r}\n"
        "open(here + '/writer.argv', 'w').write(' '.join(sys.argv[1:]))\n"
        "open(here + '/writer.pid', 'w').write(str(os.getpid()))\n"
        f"time.sleep({HANG_S})\n"
        "open(here + '/wrote', 'w').write('too late')\n"
    )
    exists.chmod(0o755)
    writer.chmod(0o755)
    return tools


def build_with_tools(tmp_path: Path, tools: Path, timeout_ms: int) -> Path:
    flags = [*makefile_cflags(), f'-DTOOL_PATH="{tools}"', f"-DTOOL_TIMEOUT_MS={timeout_ms}"]
    return build(tmp_path / f"blockbroker-block-{timeout_ms}", flags)


def gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_hanging_xenstore_write_is_killed_at_the_deadline(tmp_path: Path) -> None:
    tools = fake_tools(tmp_path / "tools")
    binary = build_with_tools(tmp_path, tools, timeout_ms=500)
    started = time.monotonic()
    with FakeBus(tmp_path / "bus", REFUSED) as bus:
        result = run_script(binary, "add", bus.address, BE, timeout=20)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert took < 5, f"the script took {took:.1f} s with a 0.5 s tool deadline"
    assert "xenstore-write did not finish within 500 ms; killed" in result.stderr
    assert "org.qubes.BlockBroker1.Error.Refused: not allowed" in result.stderr
    argv = (tools / "writer.argv").read_text()
    assert argv == (
        f"-- {BE}/hotplug-error org.qubes.BlockBroker1.Error.Refused: not allowed "
        f"{BE}/hotplug-status error"
    )
    assert gone(int((tools / "writer.pid").read_text()))
    time.sleep(0.3)
    assert not (tools / "wrote").exists()


def test_the_writer_dies_with_the_script(tmp_path: Path) -> None:
    """libxl's hotplug timeout SIGKILLs the script: its xenstore-write goes too, at once."""
    tools = fake_tools(tmp_path / "tools")
    binary = build_with_tools(tmp_path, tools, timeout_ms=HANG_S * 2000)
    with FakeBus(tmp_path / "bus", REFUSED) as bus:
        env = {
            "PATH": "/usr/bin:/bin",
            "XENBUS_PATH": BE,
            "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
        }
        script = subprocess.Popen(
            [str(binary), "add"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            assert wait_until((tools / "writer.pid").exists, 10), "xenstore-write never ran"
            writer = int((tools / "writer.pid").read_text())
            assert not gone(writer)
            os.kill(script.pid, signal.SIGKILL)
            assert script.wait(timeout=5) == -signal.SIGKILL
            assert wait_until(lambda: gone(writer), 2), f"xenstore-write {writer} outlived it"
        finally:
            if script.poll() is None:
                script.kill()
                script.wait()
    time.sleep(0.3)
    assert not (tools / "wrote").exists()
