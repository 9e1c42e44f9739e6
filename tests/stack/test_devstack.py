"""scripts/devstack end to end: start, what CMD sees, exit status, teardown and its leak check.

Test harness tests, run as root against real oxenstored, dbus-daemon and the broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import loops
from harness.cli import EXIT_STARTUP_FAILED, EXIT_TEARDOWN_PROBLEM

pytestmark = [pytest.mark.root, pytest.mark.daemon]

DEVSTACK = Path(__file__).resolve().parents[2] / "scripts" / "devstack"


def devstack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEVSTACK), *args], capture_output=True, text=True, check=False
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(f"{entry}: {cmdline.decode(errors='replace')}")
    return found


def test_starts_and_tears_down_cleanly() -> None:
    result = devstack("--no-policyd", "--", "sh", "-c", 'echo "$BLOCKBROKER_STACK_DIR"')
    assert result.returncode == 0, result.stderr
    stack_dir = result.stdout.strip()
    assert stack_dir.startswith("/")
    assert "event=stack_ready" in result.stderr
    assert not Path(stack_dir).exists(), "a clean run removes its stack dir"
    assert processes_mentioning(stack_dir) == []


def test_command_sees_xenstore_with_registered_domains() -> None:
    script = (
        "xenstore-read /local/domain/7/name /local/domain/0/name; "
        "xenstore-ls -p /local/domain/7 | grep -E '^(device|data) '; "
        # tools that ignore XENSTORED_PATH find the stack at the fixed path too
        "env -u XENSTORED_PATH xenstore-read /local/domain/7/domid"
    )
    result = devstack("--no-policyd", "--domain", "vm7=7", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["vm7", "Domain-0"]
    assert any(line.startswith("device") and line.endswith("(n0,r7)") for line in lines)
    assert any(line.startswith("data") and line.endswith("(n7)") for line in lines)
    assert lines[-1] == "7"


def test_command_sees_the_bus_and_the_broker() -> None:
    script = (
        'busctl --address="$DBUS_SYSTEM_BUS_ADDRESS" list --no-pager --no-legend | cut -d" " -f1; '
        "dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus "
        "org.freedesktop.DBus.GetId >/dev/null && echo dbus-send-ok; "
        'test -S "$BLOCKBROKER_STACK_DIR/broker.sock" && echo broker-socket-ok; '
        'test -d "$BLOCKBROKER_IMAGE_DIR" && echo image-dir-ok'
    )
    result = devstack("--no-policyd", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "org.freedesktop.DBus" in lines
    assert {"dbus-send-ok", "broker-socket-ok", "image-dir-ok"} <= set(lines)


@pytest.mark.parametrize("status", [0, 1, 7])
def test_exit_status_of_command_is_propagated(status: int) -> None:
    result = devstack("--no-policyd", "--no-broker", "--", "sh", "-c", f"exit {status}")
    assert result.returncode == status, result.stderr


def test_command_killed_by_signal_exits_128_plus_signal() -> None:
    result = devstack("--no-policyd", "--no-broker", "--", "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + 15, result.stderr


def test_missing_command_is_a_usage_error() -> None:
    result = devstack("--no-policyd")
    assert result.returncode == 2
    assert "no command given" in result.stderr


def test_leaked_loop_under_allowed_root_fails_teardown(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    image = root / "leak.img"
    script = f'truncate -s 1M "{image}" && losetup -f "{image}"'
    stack_dir = str(tmp_path / "stack")  # a failed run keeps its stack dir: keep it in tmp_path
    result = devstack(
        "--no-policyd",
        "--stack-dir",
        stack_dir,
        "--allow-root",
        str(root),
        "--",
        "sh",
        "-c",
        script,
    )
    assert result.returncode == EXIT_TEARDOWN_PROBLEM, result.stderr
    assert f"still bound to {image}" in result.stderr
    assert "command exited with status 0" in result.stderr
    assert loops.loops_under([root]) == [], "devstack detaches what it reports"


def test_startup_failure_names_the_daemon_and_shows_its_log(tmp_path: Path) -> None:
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    broken = fake_venv / "bin" / "blockbroker-broker"
    broken.write_text("#!/bin/sh\necho 'broken broker says hello' >&2\nexit 3\n")
    broken.chmod(0o755)
    env = {**os.environ, "BLOCKBROKER_VENV": str(fake_venv)}
    result = subprocess.run(
        [
            sys.executable,
            str(DEVSTACK),
            "--no-policyd",
            "--stack-dir",
            str(tmp_path / "s"),
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == EXIT_STARTUP_FAILED
    assert "broker: exited with status 3" in result.stderr
    assert "broken broker says hello" in result.stderr


def test_polkitd_registers_exactly_the_projects_actions(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "10-nothing.rules").write_text("polkit.addRule(function(action, subject) {});\n")
    policy_dir = Path(__file__).resolve().parents[2] / "policy"
    expected = sorted(
        line.split('"')[1]
        for policy in policy_dir.glob("*.policy")
        for line in policy.read_text().splitlines()
        if "<action id=" in line
    )
    result = devstack("--no-policyd", "--no-broker", "--polkit-rules", str(rules), "--", "pkaction")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == expected


def test_sigterm_to_devstack_reaches_the_command_and_still_tears_down() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(DEVSTACK), "--no-policyd", "--no-broker", "--",
         "sh", "-c", 'echo "$BLOCKBROKER_STACK_DIR"; exec sleep 60'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    stack_dir = proc.stdout.readline().strip()
    proc.terminate()
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + 15, stderr
    assert "event=command_exited status=143" in stderr
    assert not Path(stack_dir).exists()
    assert processes_mentioning(stack_dir) == []


def test_ctrl_c_ends_the_command_but_not_the_teardown() -> None:
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    proc = subprocess.Popen(
        [sys.executable, str(DEVSTACK), "--no-policyd", "--no-broker", "--",
         "sh", "-c", 'echo "$BLOCKBROKER_STACK_DIR"; exec sleep 60'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    stack_dir = proc.stdout.readline().strip()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert not Path(stack_dir).exists()
    assert processes_mentioning(stack_dir) == []


def test_daemons_that_keep_their_credentials_die_with_a_killed_devstack() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(DEVSTACK), "--", "sh", "-c",
         'echo "$$ $BLOCKBROKER_STACK_DIR"; exec sleep 60'],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    command_pid, stack_dir = proc.stdout.readline().split()
    proc.kill()  # no teardown at all
    proc.wait()
    os.kill(int(command_pid), signal.SIGKILL)
    try:
        # oxenstored, the broker and policyd get SIGTERM from the kernel (PR_SET_PDEATHSIG);
        # dbus-daemon dropped to messagebus itself, which clears that, so it is left over.
        for _ in range(1000):
            left = processes_mentioning(stack_dir)
            if all("dbus-daemon" in entry for entry in left):
                break
            time.sleep(0.01)
        assert all("dbus-daemon" in entry for entry in left), left
    finally:
        for entry in processes_mentioning(stack_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(stack_dir, ignore_errors=True)


def test_sigterm_while_the_stack_starts_stops_what_started(tmp_path: Path) -> None:
    started = tmp_path / "broker-started"
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    never_ready = fake_venv / "bin" / "blockbroker-broker"
    never_ready.write_text(
        f"#!/bin/sh\necho $$ > '{started}.tmp'\nmv '{started}.tmp' '{started}'\nexec sleep 60\n"
    )
    never_ready.chmod(0o755)
    stack_dir = tmp_path / "stack"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(DEVSTACK),
            "--no-policyd",
            "--stack-dir",
            str(stack_dir),
            "--",
            "true",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "BLOCKBROKER_VENV": str(fake_venv)},
    )
    for _ in range(2000):  # bounded: the stack's own start-up timeout is 20 s
        if started.exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert started.exists()
    proc.terminate()
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "while the stack started" in stderr
    assert processes_mentioning(str(stack_dir)) == []
    fake_broker_pid = started.read_text().strip()
    assert not Path(f"/proc/{fake_broker_pid}").exists(), "the half-started broker was stopped"
