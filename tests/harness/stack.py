"""The host stack: real oxenstored, a private system bus, the broker, policyd, optionally polkitd.

Test harness, runs as root. `Stack(StackConfig(...))` is a context manager; `start()` brings the
daemons up in dependency order, `stop()` tears them down in reverse and reports leaks (daemon
processes left behind, loop devices still bound to files under the stack's dirs). The same code
serves scripts/devstack and the pytest fixtures in harness.fixtures.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pyxs import Client
from pyxs._internal import Op
from pyxs.exceptions import PyXSError

from harness import loops, polkit, xenstore
from harness.bus import BusDaemon, BusProbe
from harness.names import BUS_NAME
from harness.procs import Daemon, StackError, log, tail
from harness.systemd import BUS_POLICY, UserManager

REPO = Path(__file__).resolve().parents[2]
SERVICE_USER = "blockbroker"
POLKIT_BUS_NAME = polkit.BUS_NAME
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _group_of(user: str | int) -> int:
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    return entry.pw_gid


@dataclass
class StackConfig:
    """What to start. Paths given here are used as they are; the stack's own live in stack_dir."""

    domains: dict[str, int] = field(default_factory=dict)
    allow_roots: list[Path] = field(default_factory=list)
    broker: bool = True
    policyd: bool = True
    polkit_rules: Path | None = None
    # A stand-in for xen-blkback's sysfs: with it policyd waits for `physical_device`, which
    # tests write with Stack.blkback_open(); without it the host has no blkback, as here.
    sysfs_blkback: bool = False
    stack_dir: Path | None = None  # default: a fresh dir under $TMPDIR
    keep_stack_dir: bool = False  # default: removed after a clean teardown, kept after a failure
    venv: Path = field(
        default_factory=lambda: Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
    )
    project_bus_policy_dir: Path = REPO / "dbus"
    project_polkit_actions_dir: Path = REPO / "policy"
    # The export policy for policyd's --policy-dir, default the repository's shipped one. It is
    # copied to STACKDIR/policy.d (Stack.policy_dir: edit that one to test reloads), so policyd
    # (user blockbroker) can read it even when this dir is under a 0700 parent like tmp_path.
    policy_dir: Path = REPO / "policy" / "policy.d"
    policyd_args: list[str] = field(default_factory=list)  # more policyd options
    # policyd's --block-socket (Stack.block_socket, in a 0700 dir of policyd's user): the block
    # script's direct path. Off: the script finds no socket there and calls over D-Bus.
    block_socket: bool = True
    start_timeout_s: float = field(
        default_factory=lambda: _env_float("BLOCKBROKER_STACK_TIMEOUT", 20.0)
    )
    stop_timeout_s: float = 5.0
    loop_settle_s: float = 2.0
    # Run the broker (socket-activated) and policyd (Type=dbus) as units of a real systemd
    # user manager (harness.systemd) that uses the stack's bus as its user bus.
    systemd: bool = False
    # policyd's start limit under systemd (StartLimitBurst= in 60 s); 0: none
    start_limit_burst: int = 0


class Stack:
    """A running (or stopped) host stack; attributes name everything a client needs."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        for name, domid in self.config.domains.items():
            if not 0 < domid < 0x7FF0 or not name or "/" in name:
                raise StackError(f"bad --domain {name}={domid}: need NAME=DOMID, 0 < DOMID < 32752")
        self.domains: dict[str, int] = {"Domain-0": 0, **self.config.domains}
        self._own_dir = self.config.stack_dir is None
        base = self.config.stack_dir or Path(tempfile.mkdtemp(prefix="blockbroker-stack-"))
        base.mkdir(parents=True, exist_ok=True)
        # The broker refuses file roots containing symlinks, so name everything by its real path.
        self.stack_dir = Path(os.path.realpath(base))
        self.stack_dir.chmod(0o755)
        self.image_dir = self.stack_dir / "images"
        self.sysfs_root = self.stack_dir / "sysfs"
        self.blkback_devices_dir = self.sysfs_root / "bus/xen-backend/devices"
        self.xenstored_dir = self.stack_dir / "xenstored"
        self.xenstored_run_dir = self.xenstored_dir / "run"
        self.xenstore_path = self.xenstored_run_dir / "socket"
        self.bus_dir = self.stack_dir / "bus"
        self.broker_config = self.stack_dir / "broker.toml"
        self.broker_socket = self.stack_dir / "broker.sock"
        self.policyd_run_dir = self.stack_dir / "policyd-run"  # like RuntimeDirectory=, 0700
        self.block_socket = self.policyd_run_dir / "block.sock"
        self.policy_dir = self.stack_dir / "policy.d"
        self.polkit_dir = self.stack_dir / "polkit"
        self.polkit_rules_dir = self.polkit_dir / "rules.d"
        self.allow_roots = [Path(os.path.realpath(root)) for root in self.config.allow_roots]
        self.bus_address = ""
        self.timings_ms: dict[str, float] = {}
        self.daemons: dict[str, Daemon] = {}
        self._xs: Client | None = None
        self._probe: BusProbe | None = None
        self.manager: UserManager | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.stop()
        if problems and exc is None:
            raise StackError("teardown found problems:\n  " + "\n  ".join(problems))

    def start(self) -> None:
        """Start every daemon; on failure stop what did start and raise StackError."""
        started = time.monotonic()
        try:
            self.image_dir.mkdir(exist_ok=True)
            self.sysfs_root.mkdir(exist_ok=True)
            if self.config.sysfs_blkback:
                self.blkback_devices_dir.mkdir(parents=True, exist_ok=True)
            self._start_xenstore()
            self._start_bus()
            if self.config.systemd:
                self._start_manager()
            if self.config.broker:
                self._start_broker()
            if self.config.polkit_rules is not None:
                self._start_polkit(self.config.polkit_rules)
            if self.config.policyd:
                self.start_policyd()
        except BaseException:
            for problem in self.stop(failed=True):
                log("teardown_problem", problem=problem)
            raise
        self.timings_ms["total"] = (time.monotonic() - started) * 1e3
        log(
            "stack_ready",
            stack_dir=self.stack_dir,
            **{f"{k}_ms": f"{v:.1f}" for k, v in self.timings_ms.items()},
        )

    def stop(self, failed: bool = False) -> list[str]:
        """Stop all daemons in reverse start order, then look for leaks. Returns the problems."""
        problems: list[str] = []
        probe, xs, self._probe, self._xs = self._probe, self._xs, None, None
        try:
            if probe is not None:
                probe.close()
            if xs is not None:
                xs.close()
        except Exception as e:  # a broken client connection must not keep daemons alive
            problems.append(f"closing the harness's own connections: {e!r}")
        manager, self.manager = self.manager, None
        if manager is not None:  # started after the bus; holds the broker and policyd
            problems.extend(manager.teardown(self.config.stop_timeout_s))
        for name in reversed(list(self.daemons)):
            problems.extend(self.daemons.pop(name).stop(self.config.stop_timeout_s))
        for loop in loops.leaked_loops(self.leak_roots(), self.config.loop_settle_s):
            problems.append(f"loop device {loop.path} still bound to {loop.backing_file}")
            if error := loops.detach(loop):
                problems.append(f"could not detach {loop.path}: {error}")
        keep = self.config.keep_stack_dir or failed or bool(problems)
        if self._own_dir and not keep:
            shutil.rmtree(self.stack_dir, ignore_errors=True)
        elif keep:
            log("stack_dir_kept", stack_dir=self.stack_dir)
        return problems

    def leak_roots(self) -> list[Path]:
        return [self.stack_dir, *self.allow_roots]

    # ---- daemons ---------------------------------------------------------------------------

    def _launch(self, daemon: Daemon, ready: Callable[[], bool], what: str) -> None:
        """Start `daemon` and wait until `ready`; records the time from spawn to ready."""
        started = time.monotonic()
        self.daemons[daemon.name] = daemon
        daemon.start()
        daemon.wait_ready(ready, what, self.config.start_timeout_s)
        self.timings_ms[daemon.name] = (time.monotonic() - started) * 1e3

    def _start_xenstore(self) -> None:
        self.xenstored_run_dir.mkdir(parents=True, exist_ok=True)
        daemon = xenstore.oxenstored_daemon(
            self.xenstored_dir, self.xenstored_run_dir, self.stack_dir / "oxenstored.log"
        )
        self._launch(daemon, lambda: xenstore.answers(self.xenstore_path), "its socket to answer")
        xenstore.share_socket(self.xenstored_run_dir, SERVICE_USER)
        client = self.xs
        xenstore.register_dom0(client)
        for name, domid in self.config.domains.items():
            xenstore.register_domain(client, name, domid)

    def _start_bus(self) -> None:
        self.bus_dir.mkdir(exist_ok=True)
        if self.config.systemd:
            (self.bus_dir / "system.d").mkdir(exist_ok=True)
            (self.bus_dir / "system.d" / "systemd1.conf").write_text(BUS_POLICY)
        daemon = BusDaemon(
            self.bus_dir, self.config.project_bus_policy_dir, self.stack_dir / "dbus.log"
        )
        self._launch(daemon, daemon.address_printed, "its address on the pipe")
        self.bus_address = daemon.address
        self._probe = BusProbe(self.bus_address)

    def restart_bus(self) -> None:
        """Stop dbus-daemon and start a new one on the same socket (every client loses its
        connection: policyd exits and, under systemd, comes back through Restart=)."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        daemon = self.daemons.pop("dbus")
        problems = daemon.stop(self.config.stop_timeout_s)
        if problems:
            raise StackError("stopping dbus-daemon: " + "; ".join(problems))
        order = list(self.daemons)
        self._start_bus()
        # keep the teardown order: the bus stops after the daemons that use it
        self.daemons = {"dbus": self.daemons.pop("dbus"), **{n: self.daemons[n] for n in order}}

    def _write_broker_config(self) -> None:
        roots = [*self.allow_roots, self.image_dir]
        text = (
            f"client_user = {json.dumps(SERVICE_USER)}\n"
            f"file_roots = [{', '.join(json.dumps(str(root)) for root in roots)}]\n"
            "block_majors = [7]\n"
        )
        self.broker_config.write_text(text)
        os.chown(self.broker_config, 0, 0)
        self.broker_config.chmod(0o644)

    def _start_manager(self) -> None:
        started = time.monotonic()
        self.manager = UserManager(
            self.stack_dir / "systemd",
            bus_socket=self.bus_dir / "system_bus_socket",
            log_path=self.stack_dir / "systemd.log",
        )
        self.manager.launch(self.config.start_timeout_s)
        self.timings_ms["systemd"] = (time.monotonic() - started) * 1e3

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl --user ARGS` against the stack's manager (StackConfig(systemd=True))."""
        if self.manager is None:
            raise StackError("this stack runs no systemd manager")
        return self.manager.systemctl(*args, check=check)

    def _broker_argv(self) -> list[str]:
        return [
            str(self.config.venv / "bin/blockbroker-broker"),
            "--config",
            str(self.broker_config),
        ]

    def _start_broker_unit(self, manager: UserManager) -> None:
        """dbus/blockbroker-broker.socket's settings at the stack's socket path; the broker
        starts on the first connection and takes the socket from LISTEN_FDS."""
        started = time.monotonic()
        manager.write_unit(
            "blockbroker-broker.socket",
            "[Socket]\n"
            f"ListenSequentialPacket={self.broker_socket}\n"
            "SocketUser=root\nSocketGroup=blockbroker\nSocketMode=0660\nAccept=no\n",
        )
        manager.write_unit(
            "blockbroker-broker.service",
            "[Unit]\nRequires=blockbroker-broker.socket\nAfter=blockbroker-broker.socket\n"
            # chaos kills it many times a minute: without this, systemd's default start limit
            # (5 in 10 s) fails the service, and with it the socket (connections refused)
            "StartLimitIntervalSec=0\n"
            "[Service]\nType=simple\n"
            f"ExecStart={' '.join(self._broker_argv())}\n"
            "Restart=on-failure\nRestartSec=100ms\n"
            f"StandardOutput=append:{self.stack_dir / 'broker.log'}\nStandardError=inherit\n",
        )
        manager.daemon_reload()
        manager.start("blockbroker-broker.socket")
        self.timings_ms["broker"] = (time.monotonic() - started) * 1e3

    def _start_broker(self) -> None:
        self._write_broker_config()
        if self.manager is not None:
            self._start_broker_unit(self.manager)
            return
        daemon = Daemon(
            name="broker",
            argv=[
                str(self.config.venv / "bin/blockbroker-broker"),
                "--config",
                str(self.broker_config),
                "--socket",
                str(self.broker_socket),
            ],
            log_path=self.stack_dir / "broker.log",
            env={"PATH": DAEMON_PATH},
        )
        self._launch(daemon, self._broker_accepts, "its socket to accept a connection")

    def _broker_accepts(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                probe.connect(str(self.broker_socket))
        except OSError:
            return False
        return True

    def _start_polkit(self, rules: Path) -> None:
        daemon = polkit.polkitd_daemon(
            self.polkit_dir,
            rules,
            self.config.project_polkit_actions_dir,
            self.bus_address,
            self.stack_dir / "polkitd.log",
        )
        self._launch(
            daemon, lambda: self.has_owner(POLKIT_BUS_NAME), f"{POLKIT_BUS_NAME} on the bus"
        )

    def start_policyd(self) -> None:
        """Start policyd as user blockbroker; ready once it owns org.qubes.BlockBroker1."""
        if "policyd" in self.daemons:
            raise StackError("policyd is already running")
        if not self.policy_dir.exists():  # a restart keeps the (maybe edited) copy
            shutil.copytree(self.config.policy_dir, self.policy_dir)
            for path in [self.policy_dir, *self.policy_dir.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        if not self.policyd_run_dir.exists():
            self.policyd_run_dir.mkdir(mode=0o700)
            pw = pwd.getpwnam(SERVICE_USER)
            os.chown(self.policyd_run_dir, pw.pw_uid, pw.pw_gid)
        if self.manager is not None:
            self._start_policyd_unit(self.manager)
            return
        daemon = Daemon(
            name="policyd",
            argv=self._policyd_argv(),
            log_path=self.stack_dir / "policyd.log",
            env={"PATH": DAEMON_PATH, "PYTHONUNBUFFERED": "1"},
            user=SERVICE_USER,
        )
        self._launch(daemon, lambda: self.has_owner(BUS_NAME), f"{BUS_NAME} on the bus")

    POLICYD_UNIT = "blockbroker-policyd.service"

    def _start_policyd_unit(self, manager: UserManager) -> None:
        """The settings of dbus/blockbroker-policyd.service that work in a user manager: Type=dbus
        (active once it owns its name), Restart=, the fd store, LimitNOFILE. Not the sandboxing
        (ProtectSystem= and friends need mount namespaces per service; untested here)."""
        started = time.monotonic()
        manager.write_unit(
            self.POLICYD_UNIT,
            "[Unit]\nAfter=blockbroker-broker.socket\n"
            + (
                f"StartLimitIntervalSec=60s\nStartLimitBurst={self.config.start_limit_burst}\n"
                if self.config.start_limit_burst
                else "StartLimitIntervalSec=0\n"
            )
            + f"[Service]\nType=dbus\nBusName={BUS_NAME}\n"
            f"User={SERVICE_USER}\nGroup={SERVICE_USER}\n"
            f"ExecStart={' '.join(self._policyd_argv())}\n"
            "Environment=PYTHONUNBUFFERED=1\n"
            "Restart=on-failure\nRestartSec=100ms\n"
            "FileDescriptorStoreMax=1024\nLimitNOFILE=4096\n"
            f"StandardOutput=append:{self.stack_dir / 'policyd.log'}\nStandardError=inherit\n",
        )
        manager.daemon_reload()
        manager.start(self.POLICYD_UNIT)
        self.timings_ms["policyd"] = (time.monotonic() - started) * 1e3

    def _policyd_argv(self) -> list[str]:
        return [
            str(self.config.venv / "bin/blockbroker-policyd"),
            "--broker-socket",
            str(self.broker_socket),
            "--xenstore-path",
            str(self.xenstore_path),
            "--sysfs-root",
            str(self.sysfs_root),
            "--bus-address",
            self.bus_address,
            "--policy-dir",
            str(self.policy_dir),
            *(["--block-socket", str(self.block_socket)] if self.config.block_socket else []),
            *self.config.policyd_args,
        ]

    def stop_policyd(self) -> list[str]:
        """Stop policyd (SIGTERM, bounded wait, SIGKILL); returns problems found."""
        if self.manager is not None:
            done = self.manager.systemctl("stop", self.POLICYD_UNIT, check=False)
            return [] if done.returncode == 0 else [f"systemctl stop: {done.stderr.strip()}"]
        daemon = self.daemons.pop("policyd", None)
        return [] if daemon is None else daemon.stop(self.config.stop_timeout_s)

    def restart_policyd(self) -> None:
        if self.manager is not None:  # one restart job: keeps the fd store
            self.manager.restart(self.POLICYD_UNIT)
            return
        problems = self.stop_policyd()
        if problems:
            raise StackError("stopping policyd: " + "; ".join(problems))
        self.start_policyd()

    # ---- clients ---------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client of the stack: `blockbroker`, busctl, xenstore-* reach it."""
        env = dict(os.environ if base is None else base)
        env.update(
            DBUS_SYSTEM_BUS_ADDRESS=self.bus_address,
            XENSTORED_PATH=str(self.xenstore_path),
            BLOCKBROKER_STACK_DIR=str(self.stack_dir),
            BLOCKBROKER_IMAGE_DIR=str(self.image_dir),
            BLOCKBROKER_BROKER_SOCKET=str(self.broker_socket),
            # always set, so a script run here never reaches a system policyd's socket
            BLOCKBROKER_BLOCK_SOCKET=str(self.block_socket),
            PATH=f"{self.config.venv / 'bin'}:{env.get('PATH', DAEMON_PATH)}",
        )
        return env

    def run(
        self, argv: list[str], user: str | int | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a client against the stack (its env()), as root or as `user` (name or uid; no
        supplementary groups); output captured as text."""
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={_group_of(user)}", "--clear-groups",
                    *argv]  # fmt: skip
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, check=check)

    def has_owner(self, name: str) -> bool:
        if self._probe is None:
            raise StackError("the bus is not running")
        return self._probe.has_owner(name)

    def log_path(self, daemon: str) -> Path:
        """Log file of a daemon: oxenstored, dbus, broker, policyd, polkitd."""
        return self.stack_dir / f"{daemon}.log"

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        return tail(self.log_path(daemon), lines)

    def leaked_loops(self) -> list[loops.LoopDevice]:
        """Loop devices currently bound to files under the stack's dirs and allowed roots."""
        return loops.loops_under(self.leak_roots())

    def make_image(self, name: str, size: int = 1 << 20, content: bytes = b"") -> Path:
        """A sparse image file in the stack's image dir (an allowed broker root)."""
        path = self.image_dir / name
        with open(path, "wb") as f:
            f.write(content)
            f.truncate(max(size, len(content)))
        return path

    def blkback_open(self, frontend_domid: int, devid: int, major: int, minor: int) -> Path:
        """Play xen-blkback having opened major:minor for vbd-FE-DEVID (needs sysfs_blkback):
        the kernel shows it as `physical_device` = "%x:%x" in the backend device's sysfs dir."""
        if not self.config.sysfs_blkback:
            raise StackError("blkback_open needs StackConfig(sysfs_blkback=True)")
        device = self.blkback_devices_dir / f"vbd-{frontend_domid}-{devid}"
        device.mkdir(exist_ok=True)
        (device / "physical_device").write_text(f"{major:x}:{minor:x}\n")
        return device

    def blkback_close(self, frontend_domid: int, devid: int) -> None:
        """Play xen-blkback having released the device: its sysfs dir disappears."""
        shutil.rmtree(
            self.blkback_devices_dir / f"vbd-{frontend_domid}-{devid}", ignore_errors=True
        )

    # XenStore, as dom0 (every socket client of this oxenstored is privileged).

    @property
    def xs(self) -> Client:
        if self._xs is None:
            self._xs = Client(unix_socket_path=str(self.xenstore_path))
            self._xs.connect()
        return self._xs

    def xs_read(self, path: str) -> str | None:
        """The node's value, None if it does not exist (one READ: a node removed while a test
        polls for that is None, not an error between an exists and a read)."""
        try:
            return bytes(self.xs.read(path.encode())).decode()
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise

    def xs_exists(self, path: str) -> bool:
        return bool(self.xs.exists(path.encode()))

    def xs_write(self, path: str, value: str) -> None:
        """Write `value` (may be empty: pyxs's write() refuses that, WRITE of "path\\0" is it)."""
        self.xs.ack(Op.WRITE, path.encode() + b"\0" + value.encode())

    def xs_rm(self, path: str) -> None:
        self.xs.delete(path.encode())

    def xs_ls(self, path: str) -> list[str]:
        return [bytes(child).decode() for child in self.xs.list(path.encode())]

    def xs_perms(self, path: str) -> list[str]:
        return [bytes(p).decode() for p in self.xs.get_perms(path.encode()) if p]

    def xs_set_perms(self, path: str, perms: list[str]) -> None:
        self.xs.set_perms(path.encode(), [p.encode() for p in perms])
