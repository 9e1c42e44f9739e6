"""A desktop for GUI tests: Xvfb, a session bus and AT-SPI for a non-root user, an app on it.

Test harness, runs as root. The person's side runs as `user` (nobody): the session bus (which
starts at-spi-bus-launcher and the registry on demand) and the app, which talks to the stack's
system bus like a desktop user's tool; polkit sees that user. The AT-SPI driver
(`harness/a11y.py`) runs as root under the system Python: the a11y bus allows root, and root may
connect to the user's session bus. Xvfb picks a free display (-displayfd) and keeps its screen in
a file (-fbdir), which `screenshot` turns into a PNG.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import xwd
from harness.procs import Daemon, StackError

SYSTEM_PYTHON = "/usr/bin/python3"
A11Y_DRIVER = Path(__file__).with_name("a11y.py")
SCREEN = (900, 600)
WAIT_S = 20.0


class Desktop:
    def __init__(self, user: str = "nobody") -> None:
        # Under /tmp, not pytest's tmp_path: that one is 0700 root, and the person's side is not
        # root. Removed by stop() when nothing went wrong (kept for its logs otherwise).
        self.dir = Path(tempfile.mkdtemp(prefix="blockbroker-desktop-"))
        self.dir.chmod(0o755)
        self.user = user
        pw = pwd.getpwnam(user)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.group = grp.getgrgid(self.gid).gr_name
        self.daemons: list[Daemon] = []
        self.display = ""
        self.session_bus = f"unix:path={self.dir}/session-bus"
        self.driver: subprocess.Popen[str] | None = None

    def start(self) -> None:
        home = self.dir / "home"
        (home / "runtime").mkdir(parents=True, mode=0o700)
        (self.dir / "fb").mkdir()
        for path in (self.dir, home, home / "runtime"):
            os.chown(path, self.uid, self.gid)
        read, write = os.pipe()
        xvfb = Daemon(
            "xvfb",
            [
                "Xvfb",
                "-displayfd",
                str(write),
                "-screen",
                "0",
                f"{SCREEN[0]}x{SCREEN[1]}x24",
                "-nolisten",
                "tcp",
                "-fbdir",
                str(self.dir / "fb"),
            ],
            self.dir / "xvfb.log",
            {"PATH": os.environ["PATH"]},
            pass_fds=[write],
        )
        self.daemons.append(xvfb)
        xvfb.start()
        os.close(write)
        with os.fdopen(read) as pipe:
            self.display = ":" + pipe.readline().strip()
        if self.display == ":":
            raise xvfb.failure("gave no display number")
        bus = Daemon(
            "session-bus",
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                f"--address={self.session_bus}",
            ],
            self.dir / "session-bus.log",
            self.env(),
            user=self.user,
            group=self.group,
        )
        self.daemons.append(bus)
        bus.start()
        bus.wait_ready(lambda: (self.dir / "session-bus").exists(), "its socket", WAIT_S)

    def env(self, **extra: str) -> dict[str, str]:
        """The person's environment: display, session bus, home; GTK drawn without GL."""
        home = self.dir / "home"
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(home / "runtime"),
            "DISPLAY": self.display,
            "DBUS_SESSION_BUS_ADDRESS": self.session_bus,
            "GDK_BACKEND": "x11",
            "GSK_RENDERER": "cairo",
            "LANG": "C.UTF-8",
            **extra,
        }

    def run_app(self, name: str, argv: list[str], **env: str) -> Daemon:
        app = Daemon(
            name, argv, self.dir / f"{name}.log", self.env(**env), user=self.user, group=self.group
        )
        self.daemons.append(app)
        app.start()
        # The app's first accessible object starts the AT-SPI bus (activated on the session
        # bus); the driver connects once it is there.
        runtime = self.dir / "home" / "runtime" / "at-spi"
        app.wait_ready(
            lambda: runtime.is_dir() and any(runtime.iterdir()), "the AT-SPI bus", WAIT_S
        )
        return app

    def ask(self, **cmd: Any) -> dict[str, Any]:
        """One command to the AT-SPI driver (see harness/a11y.py); fails the test if not ok."""
        if self.driver is None:
            self.driver = subprocess.Popen(
                [SYSTEM_PYTHON, "-I", str(A11Y_DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(self.dir / "a11y.log", "ab"),  # noqa: SIM115 - the child keeps it
                env={**self.env(), "HOME": str(self.dir)},
                text=True,
            )
        assert self.driver.stdin is not None and self.driver.stdout is not None
        self.driver.stdin.write(json.dumps(cmd) + "\n")
        self.driver.stdin.flush()
        line = self.driver.stdout.readline()
        if not line:
            raise StackError(f"the AT-SPI driver ended: {(self.dir / 'a11y.log').read_text()}")
        answer: dict[str, Any] = json.loads(line)
        if not answer["ok"]:
            tree = "\n".join(answer.get("tree", []))
            raise AssertionError(f"{answer['error']}\n--- accessibility tree ---\n{tree}")
        return answer

    def screenshot(self, out: Path) -> None:
        """The app's window (its extents from AT-SPI) as a PNG."""
        x, y, w, h = self.ask(op="window")["extents"]
        time.sleep(0.3)  # let GTK finish drawing what AT-SPI already reports
        out.parent.mkdir(parents=True, exist_ok=True)
        xwd.write_png(xwd.read_rgb(self.dir / "fb" / "Xvfb_screen0"), out, (x, y, w, h))

    def stop(self) -> list[str]:
        """Everything started here, last first. The session bus's own children (the AT-SPI
        bus and registry it activated) are ended with it and are not a problem."""
        problems: list[str] = []
        if self.driver is not None:
            assert self.driver.stdin is not None
            self.driver.stdin.close()
            try:
                self.driver.wait(5)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
                problems.append("the AT-SPI driver did not end")
        for daemon in reversed(self.daemons):
            found = daemon.stop(5.0)
            if daemon.name == "session-bus":
                found = [p for p in found if "left processes behind" not in p]
            problems += found
        if not problems:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems
