"""Daemon processes of the stack: start with a log file, wait for readiness, stop, find leftovers.

Test harness, runs as root; some daemons it starts drop to another user (policyd).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import ns

POLL_INTERVAL_S = 0.003


class StackError(Exception):
    """The stack could not start, or teardown found something wrong; the message says what."""


def log(event: str, **fields: object) -> None:
    """One logfmt line on stderr."""
    parts = [f"component=devstack event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\\\n'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    print(" ".join(parts), file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"({path} does not exist)"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else f"({path} is empty)"


def session_members(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (each daemon is started as a session leader)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is parenthesised and may contain spaces.
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            members.append(int(entry))
    return members


@dataclass
class Daemon:
    """One daemon: argv, log file, optional user to run as and a pre-exec hook (namespaces)."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str]
    user: str | None = None
    group: str | None = None  # default: the group named like `user`
    preexec: Callable[[], None] | None = None
    pass_fds: Sequence[int] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=self.env,
                start_new_session=True,
                user=self.user,
                group=self.group or self.user,
                extra_groups=[] if self.user is not None else None,
                preexec_fn=self._preexec,
                pass_fds=self.pass_fds,
                close_fds=True,
            )
        log("started", daemon=self.name, pid=self.proc.pid, user=self.user or "root")

    def _preexec(self) -> None:
        """In the child, after the uid switch (if any): die with the harness, then the hook."""
        ns.die_with_parent(signal.SIGTERM)
        if self.preexec is not None:
            self.preexec()

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def failure(self, what: str) -> StackError:
        return StackError(
            f"{self.name}: {what}\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def wait_ready(self, ready: Callable[[], bool], what: str, timeout_s: float) -> float:
        """Poll `ready` until true; fail early if the daemon exits. Returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            if ready():
                waited = time.monotonic() - started
                log("ready", daemon=self.name, pid=self.pid, waited_ms=f"{waited * 1e3:.1f}")
                return waited
            if not self.running():
                assert self.proc is not None
                raise self.failure(f"exited with status {self.proc.returncode} before {what}")
            if time.monotonic() > deadline:
                raise self.failure(f"not ready after {timeout_s:g} s (waiting for {what})")
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float) -> list[str]:
        """SIGTERM, bounded wait, then SIGKILL for the whole session. Returns problems found."""
        if self.proc is None:
            return []
        problems: list[str] = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout_s:g} s")
                self._kill_session()
                self.proc.wait()
        elif self.proc.returncode != 0:
            problems.append(f"{self.name} had exited early with status {self.proc.returncode}")
        leftovers = session_members(self.pid)
        if leftovers:
            problems.append(f"{self.name} left processes behind: {leftovers}")
            self._kill_session()
        log("stopped", daemon=self.name, pid=self.pid, status=self.proc.returncode)
        return problems

    def _kill_session(self) -> None:
        for pid in session_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
