"""A real systemd 252 user manager (`systemd --user`) for tests, driven with `systemctl --user`.

Test harness, runs as root. The manager runs as root in a private mount namespace where:
- /run/systemd is a fresh tmpfs with /run/systemd/system in it (sd_booted() must succeed);
- /sys/fs/cgroup is a fresh cgroup2 mount, and the manager starts inside its own cgroup2
  subtree (blockbroker-harness-PID-N, created here at the top of the host's cgroup2 hierarchy).
  This machine has a hybrid layout (v1 controllers + name=systemd, cgroup2 at
  /sys/fs/cgroup/unified) and PID 1 is not systemd; a manager that sees the host's layout
  treats the root cgroup as its own and moves every process of the machine into
  /init.scope in each hierarchy. Seeing only cgroup2 it runs in unified mode, its root is the
  subtree it was started in, and it moves nothing but itself (into SUBTREE/init.scope);
- XDG_RUNTIME_DIR is base_dir/xdg (private and notify sockets in xdg/systemd);
- /dev/console is the log file (a bind mount): the manager writes its log there;
- SYSTEMD_UNIT_PATH is base_dir/units only: the distribution's user units (dbus.socket,
  gpg-agent sockets, …) are not loaded; a minimal set of targets is copied in. Generators off.

Service processes run in the same private mount namespace and cgroup subtree. stop() ends the
manager with SIGTERM (exit.target), then kills whatever is left in the subtree (cgroup.kill)
and removes it, reporting each leftover as a problem.

Type=dbus: a user manager follows BusName= on its user bus, $XDG_RUNTIME_DIR/bus, and connects
only once units named dbus.socket and dbus.service are active (manager_dbus_is_running()).
With `bus_socket` (the harness's own dbus-daemon) xdg/bus is a symlink to that socket and both
units are stand-ins (write_bus_stand_ins()). The manager, root on that bus, also asks for
org.freedesktop.systemd1: the bus policy must allow it (BUS_POLICY, for the bus's system.d).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from itertools import count
from pathlib import Path

from harness import ns
from harness.procs import Daemon, StackError, log

SYSTEMD = "/lib/systemd/systemd"
SYSTEMCTL = "systemctl"
DISTRO_USER_UNITS = Path("/usr/lib/systemd/user")
# The targets and exit path every user session has; the rest of the distro's units stay out.
BASE_UNITS = (
    "basic.target",
    "default.target",
    "paths.target",
    "sockets.target",
    "timers.target",
    "shutdown.target",
    "exit.target",
    "systemd-exit.service",
    "app.slice",
)
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_serial = count()
# For the harness bus's local policy dir: lets the manager own its name (as the stock
# /usr/share/dbus-1/system.d/org.freedesktop.systemd1.conf does on a real system bus).
BUS_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="org.freedesktop.systemd1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
</busconfig>
"""


def cgroup2_mount() -> Path:
    """Where the host mounts its cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    raise StackError("no cgroup2 hierarchy is mounted; the user manager needs one")


def cgroup_procs(root: Path) -> list[int]:
    """Pids in the cgroup2 subtree at `root` (host path), all levels."""
    pids: list[int] = []
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in procs.read_text().split())
    return pids


def remove_cgroup(root: Path) -> None:
    """rmdir a cgroup2 subtree bottom-up (only empty cgroups can go)."""
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()
    with contextlib.suppress(FileNotFoundError):
        root.rmdir()


class UserManager:
    """`systemd --user` in its own mount namespace and cgroup2 subtree; see the module doc.

    launch() starts it and waits until it is up; start/stop/restart/kill(unit) drive units;
    teardown() (or the context manager) ends it and returns the problems found."""

    def __init__(
        self, base_dir: Path, bus_socket: Path | None = None, log_path: Path | None = None
    ) -> None:
        self.base_dir = base_dir
        self.runtime_dir = base_dir / "xdg"
        self.unit_dir = base_dir / "units"
        self.generator_dir = base_dir / "no-generators"
        self.cgroup_name = f"blockbroker-harness-{os.getpid()}-{next(_serial)}"
        self.cgroup = cgroup2_mount() / self.cgroup_name  # host path of the subtree
        self.bus_socket = bus_socket
        env = {
            "PATH": DAEMON_PATH,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "SYSTEMD_UNIT_PATH": str(self.unit_dir),
            "SYSTEMD_GENERATOR_PATH": str(self.generator_dir),
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(self.generator_dir),
            "SYSTEMD_LOG_TIME": "1",
        }
        if bus_socket is not None:  # for the services; the manager itself uses xdg/bus
            env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={bus_socket}"
        self.daemon = Daemon(
            name="systemd",
            argv=[SYSTEMD, "--user", "--log-target=console", "--log-level=info"],
            log_path=log_path or base_dir / "systemd.log",
            env=env,
            preexec=self._enter_sandbox,
        )
        self.started_s = 0.0

    def __enter__(self) -> UserManager:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.teardown()
        if problems and exc[0] is None:
            raise StackError("user manager teardown: " + "; ".join(problems))

    # ---- lifecycle -------------------------------------------------------------------------

    def launch(self, timeout_s: float = 20.0) -> float:
        """Start the manager and wait until start-up is complete; returns the seconds taken."""
        for d in (self.runtime_dir, self.unit_dir, self.generator_dir):
            d.mkdir(parents=True, exist_ok=True)
        # services run as other users (blockbroker) reach NOTIFY_SOCKET under xdg/systemd
        self.base_dir.chmod(0o755)
        self.runtime_dir.chmod(0o755)
        for unit in BASE_UNITS:
            shutil.copyfile(DISTRO_USER_UNITS / unit, self.unit_dir / unit)
        if self.bus_socket is not None:
            (self.runtime_dir / "bus").symlink_to(self.bus_socket)
            self.write_bus_stand_ins()
        self.cgroup.mkdir()
        started = time.monotonic()
        try:
            self.daemon.start()
            self.daemon.wait_ready(self._answers, "SystemState=running", timeout_s)
        except BaseException:
            for problem in self.teardown():
                log("teardown_problem", problem=problem)
            raise
        if self.bus_socket is not None:
            self.systemctl("start", "dbus.socket", "dbus.service")
        # NOTIFY_SOCKET must be writable by services that drop to another user (setpriv, User=)
        self.notify_socket.chmod(0o777)
        self.started_s = time.monotonic() - started
        return self.started_s

    def _enter_sandbox(self) -> None:
        """preexec_fn (in the child, before exec): the namespace and cgroup of the module doc."""
        ns.enter_private_mount_namespace()
        ns.mount_fs("tmpfs", Path("/run/systemd"), "mode=0755")
        os.mkdir("/run/systemd/system")
        ns.mount_fs("cgroup2", Path("/sys/fs/cgroup"))
        # The manager logs to /dev/console whatever --log-target says (it reopens the console);
        # in this namespace that is the log file.
        ns.bind_mount(self.daemon.log_path, Path("/dev/console"))
        Path(f"/sys/fs/cgroup/{self.cgroup_name}/cgroup.procs").write_text(str(os.getpid()))

    @property
    def private_socket(self) -> Path:
        return self.runtime_dir / "systemd/private"

    @property
    def notify_socket(self) -> Path:
        return self.runtime_dir / "systemd/notify"

    def _answers(self) -> bool:
        if not self.private_socket.exists():
            return False
        # `is-system-running` says "offline" here: it checks sd_booted() on systemctl's side
        done = self.systemctl("show", "-P", "SystemState", check=False)
        return done.stdout.strip() in ("running", "degraded")

    def log_tail(self, lines: int = 30) -> str:
        return self.daemon.log_tail(lines)

    def teardown(self, timeout_s: float = 10.0) -> list[str]:
        """SIGTERM (the manager runs exit.target: every unit stopped), then clear the subtree."""
        problems = self.daemon.stop(timeout_s)
        leftovers = cgroup_procs(self.cgroup)
        if leftovers:
            problems.append(f"processes left in the manager's cgroup: {leftovers}")
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + timeout_s
            while cgroup_procs(self.cgroup) and time.monotonic() < deadline:
                time.sleep(0.01)
        remove_cgroup(self.cgroup)
        if self.cgroup.exists():
            problems.append(f"could not remove cgroup {self.cgroup}")
        return problems

    # ---- systemctl -------------------------------------------------------------------------

    def env_for_clients(self) -> dict[str, str]:
        return {"PATH": DAEMON_PATH, "XDG_RUNTIME_DIR": str(self.runtime_dir)}

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl --user ARGS` against this manager (through xdg/systemd/private)."""
        done = subprocess.run(
            [SYSTEMCTL, "--user", "--no-pager", *args],
            env=self.env_for_clients(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            units = [a for a in args if "." in a and not a.startswith("-")]
            status = subprocess.run(
                [SYSTEMCTL, "--user", "--no-pager", "status", "--lines=0", *units],
                env=self.env_for_clients(),
                capture_output=True,
                text=True,
            ).stdout
            raise StackError(
                f"systemctl --user {' '.join(args)}: status {done.returncode}: "
                f"{done.stderr.strip()}\n{status}--- manager log ---\n{self.log_tail()}"
            )
        return done

    def write_unit(self, name: str, text: str) -> Path:
        path = self.unit_dir / name
        path.write_text(text)
        return path

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def start(self, unit: str) -> float:
        """`systemctl start` (waits for the job); returns the seconds it took."""
        started = time.monotonic()
        self.systemctl("start", unit)
        took = time.monotonic() - started
        log("unit_started", unit=unit, ms=f"{took * 1e3:.1f}")
        return took

    def stop(self, unit: str) -> None:
        self.systemctl("stop", unit)

    def restart(self, unit: str) -> None:
        self.systemctl("restart", unit)

    def kill(self, unit: str, signum: int = signal.SIGTERM, whom: str = "main") -> None:
        self.systemctl("kill", f"--kill-who={whom}", f"--signal={int(signum)}", unit)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit).stdout.rstrip("\n")

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID"))

    def is_active(self, unit: str) -> bool:
        return self.systemctl("is-active", unit, check=False).stdout.strip() == "active"

    # ---- the user bus ----------------------------------------------------------------------

    def write_bus_stand_ins(self) -> None:
        """dbus.socket and dbus.service stand-ins for the harness's own bus daemon.

        The manager connects to DBUS_SESSION_BUS_ADDRESS, but only once units dbus.socket and
        dbus.service are active; Type=dbus units also pull in dbus.socket. The bus itself is
        the harness's dbus-daemon (started outside the manager), so dbus.socket listens on an
        unused path and dbus.service only stays alive."""
        self.write_unit(
            "dbus.socket",
            "[Unit]\nDescription=stand-in: the harness's bus is started outside\n"
            "[Socket]\nListenStream=%t/bus-stand-in\n",
        )
        self.write_unit(
            "dbus.service",
            "[Unit]\nDescription=stand-in: the harness's bus is started outside\n"
            "[Service]\nExecStart=/bin/sleep infinity\n",
        )
