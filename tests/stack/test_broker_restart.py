"""A broker that meets an unexpected exception stops (status 1) instead of serving on; under
systemd, Restart= and socket activation bring a new one, policyd reconnects to it and the exports
made before are untouched. Real systemd user manager, broker, policyd, oxenstored, dbus-daemon.
Test code, runs as root.

The bug is injected by running the broker's own main() with IDENTIFY's handler replaced by one
that raises: the broker's code has no test-only path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from harness.stack import SERVICE_USER, Stack, StackConfig

pytestmark = [pytest.mark.root, pytest.mark.daemon]
BROKER_UNIT = "blockbroker-broker.service"
BUGGY_BROKER = """\
import sys
from broker import main
from broker.protocol import RequestKind
main.DISPATCH[RequestKind.IDENTIFY] = (1, lambda ops, request, fds: 1 // 0)
main.main(sys.argv[2:])  # argv[1]: the broker's own executable, which this replaces
"""


class BuggyBrokerStack(Stack):
    def _broker_argv(self) -> list[str]:
        wrapper = self.stack_dir / "buggy_broker.py"
        wrapper.write_text(BUGGY_BROKER)
        return [str(self.config.venv / "bin/python"), str(wrapper), *super()._broker_argv()]


@pytest.fixture
def stack() -> Iterator[Stack]:
    running = BuggyBrokerStack(StackConfig(domains={"work": 1}, systemd=True))
    running.start()
    yield running
    problems = running.stop()
    assert problems == [], problems


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(stack.config.venv / "bin/blockbroker"), *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def export(stack: Stack, name: str) -> dict[str, str]:
    image = stack.make_image(name, 1 << 20, name.encode())
    done = cli(stack, "export", str(image), "--to", "work", "--json")
    assert done.returncode == 0, done.stderr + stack.log_tail("policyd")
    return dict(json.loads(done.stdout))


def identify_as_client(stack: Stack) -> bytes:
    """One IDENTIFY from the broker's client user, straight on its socket (no retry): the
    injected bug. Returns the reply, b"" for none."""
    script = (
        "import array, os, socket, sys\n"
        "from broker.protocol import Request, RequestKind\n"
        "from policyd.brokerclient import encode_request\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.settimeout(10)\ns.connect({str(stack.broker_socket)!r})\n"
        "fds = array.array('i', [os.open('/dev/null', os.O_RDONLY)])\n"
        "s.sendmsg([encode_request(Request(RequestKind.IDENTIFY))],"
        " [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\n"
        "sys.stdout.buffer.write(s.recv(4096))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], user=SERVICE_USER, group=SERVICE_USER, extra_groups=[],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_broker_stops_on_a_bug_and_a_new_one_serves(stack: Stack) -> None:
    assert stack.manager is not None
    before = export(stack, "before.img")
    old = stack.manager.main_pid(BROKER_UNIT)
    assert old != 0
    restarts = int(stack.manager.show(BROKER_UNIT, "NRestarts"))

    assert identify_as_client(stack) == b""  # no reply: the broker is gone
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{old}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{old}"), "the broker served on after a bug"
    log = stack.log_tail("broker", 50)
    assert "event=fatal error=ZeroDivisionError" in log, log

    after = export(stack, "after.img")  # policyd reconnects; socket activation or Restart=
    new = stack.manager.main_pid(BROKER_UNIT)
    assert new not in (0, old)
    assert int(stack.manager.show(BROKER_UNIT, "NRestarts")) == restarts + 1  # on-failure
    listed = {
        json.loads(line)["export"] for line in cli(stack, "list", "--json").stdout.splitlines()
    }
    assert {before["export"], after["export"]} <= listed
    for e in (before, after):
        assert cli(stack, "detach", e["export"]).returncode == 0
    assert stack.leaked_loops() == []
