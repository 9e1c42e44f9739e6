"""Chaos run: random client work, SIGKILLed daemons and hostile loop-device users, with invariants.

A command (`make chaos`, CYCLES=N), not a timed benchmark. Runs as root against the host stack of
tests/harness (real oxenstored, a private dbus-daemon with the project's bus policy, the broker,
policyd as user blockbroker, and the stand-in for blkback's sysfs). In the default systemd mode
the broker (socket-activated) and policyd (Type=dbus, Restart=on-failure, the fd store) are
units of a real systemd user manager (StackConfig(systemd=True)); --mode harness starts them as
plain processes, which is policyd's degraded path (no fd store). Everything it binds, writes or
kills is its own: loop devices bound to files under the run's directories, the stack's XenStore,
processes it started. Trust level: test tooling, root.

While it runs:
  clients   CHAOS_WORKERS asyncio workers, each with its own bus connection, do random
            operations: Attach of libxl-style backends (nodes written as libxl does, then
            Manager.Attach, or the installed blockbroker-block `add`/`remove` with XENBUS_PATH),
            Export of shared read-only images to several domains and of private images
            read-write (and now and then read-write of a shared image, which must be refused),
            Detach / DetachExport. Each worker records what it was told it holds. While
            policyd is away (ServiceUnknown, NoReply) a worker backs off and tries again later,
            as a client would: a failed add is removed as libxl does (the dir is deleted even
            if `remove` fails too); an unanswered Export may have happened, so once policyd
            answers again the worker claims a listed export of that source, domain and mode
            that no worker ever held (numbers are never reused, so "ever held" is exact).
  killer    SIGKILLs policyd, the broker or a running block script at random and brings the
            daemon back (the `Target` interface: "kill X / bring X back"). systemd mode: the
            SIGKILL goes to the unit's main pid (systemctl kill) and systemd restarts policyd
            by itself (bringing it back = waiting for a new main pid that owns the bus name);
            a share of those kills is followed by a second SIGKILL while the new policyd starts
            (reconciles); the broker comes back on the next connection to its socket.
  loop users  outside the stack: a polite `losetup -f --show` (+ detach), a sloppy two-step
            `losetup -f` then `losetup /dev/loopN FILE`, and a cleanup tool that detaches any
            loop device bound to a file under the run's directories and binds it again, and binds
            unbound ones now and then. Never any other loop device.
  blkback   a stand-in for xen-blkback: it opens (holds an fd on) the device a managed backend's
            physical-device names, shows it in the stack's fake sysfs, and lets go when the
            backend goes Closing or disappears.
  checker   for every backend dir under the stack's XenStore whose params is one of the run's
            images and that has physical-device + diskseq: the device major:minor must be a loop
            device bound to that file with that diskseq (/sys/block/loopN/loop/backing_file,
            /sys/block/loopN/diskseq), re-read so a legitimate detach in between is not counted.

After quiescing (killer stopped, daemons up, loop users gone), the counts:
  wrong_device     distinct (backend, device, diskseq) seen naming another device or file
  lost_exports     holdings no longer listed by GetManagedObjects or `blockbroker list --json`
                   (checked before the final detach)
  lost_while_running  detaches of holdings answered NotFound while running (a detach that
                   went out unanswered before does not count: it may have happened)
  duplicate_loops  loop bindings (device, diskseq) that were one of several for one read-only
                   image at once (managed backends while running; sysfs before the final detach)
  rw_while_shared  read-write backends seen next to another backend of the same file
  leaked_loops     loop devices still bound to the run's images after everything was detached
  stale_backends   (reported, not an invariant) managed backend dirs left after the final
                   detach, which the run then removes
  unclaimed_exports (reported) exports listed at the end that no worker holds or claimed
  reconciled       (reported) the sums of policyd's start-up reconciliations (its log lines:
                   stored_fds, adopted, reopened, failed, released_fds; starts)
  policyd_logged   (reported) how often policyd logged each warning or error message
Progress on stderr; the last stdout line is `CHAOS {json}`. Exit status 1 if a count is not 0.

Settings (argument, else environment): --cycles (CYCLES, 10000), --workers (CHAOS_WORKERS, 4),
--max-seconds (CHAOS_MAX_SECONDS, 3600), --kill-interval (CHAOS_KILL_INTERVAL, mean seconds
between kills, 1), --seed (CHAOS_SEED), --pace (CHAOS_PACE, seconds a worker rests between
operations, 0.02), --mode (CHAOS_MODE, systemd), --startup-kill-share (CHAOS_STARTUP_KILL_SHARE,
0.2). CHAOS_KEEP_STACK_DIR=1 keeps the stack dir (policyd.log, systemd.log) after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import loops, xenstore  # noqa: E402
from harness.procs import Daemon, StackError  # noqa: E402
from harness.stack import BUS_NAME, Stack, StackConfig  # noqa: E402
from harness.systemd import UserManager  # noqa: E402
from pyxs import Client as XsClient  # noqa: E402
from pyxs.exceptions import PyXSError  # noqa: E402

from client.api import AsyncClient  # noqa: E402
from client.errors import BlockBrokerError, NotFound, ServiceUnavailable  # noqa: E402
from client.model import ExportInfo  # noqa: E402
from policyd.validate import devid_of_disk  # noqa: E402

LOOP_CLR_FD = 0x4C01
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"  # not delivered: nothing happened
# policyd (or the bus) away: the names ServiceUnavailable carries and the block script prints
UNAVAILABLE = ("ServiceUnknown", "NoReply", "NoServer", "Disconnected", "BrokerUnavailable")
BACKOFF_S = (0.1, 0.3)  # a client's pause before the next try while policyd is away
CLAIM_EVERY_S = 1.0
ATTACH_DOMAINS = {"att1": 1, "att2": 2}  # frontends of libxl-style backends (devids per worker)
EXPORT_DOMAINS = {"exp1": 3, "exp2": 4, "exp3": 5}  # frontends of Export (policyd picks devids)
SHARED_IMAGES = 3
DISKS_PER_WORKER = 4  # per attach domain
MAX_HOLD = 6  # per worker
CALL_TIMEOUT_S = 10.0
CHECK_INTERVAL_S = 0.1
PROGRESS_EVERY_S = 5.0
SETTLE_S = 2.0


STARTED = time.monotonic()


def note(event: str, **fields: object) -> None:
    """One progress line on stderr; t= is seconds since the start."""
    fields = {"t": f"{time.monotonic() - STARTED:.2f}", **fields}
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"chaos {event} {text}".rstrip(), file=sys.stderr, flush=True)


# ---- loop devices ---------------------------------------------------------------------------


def sysfs_read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def device_binding(major: int, minor: int) -> tuple[str, str | None, int | None] | None:
    """(loopN, backing file or None if unbound, diskseq) of major:minor; None if no such disk."""
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{major}:{minor}"))
    except OSError:
        return None
    backing = sysfs_read(f"/sys/block/{name}/loop/backing_file")
    seq = sysfs_read(f"/sys/block/{name}/diskseq")
    return name, backing, int(seq) if seq and seq.isdigit() else None


def diskseq_of(name: str) -> int | None:
    text = sysfs_read(f"/sys/block/{name}/diskseq")
    return int(text) if text and text.isdigit() else None


def under(path: str, roots: Iterable[Path]) -> bool:
    path = path.removesuffix(loops.DELETED_SUFFIX)
    return any(path.startswith(str(root).rstrip("/") + "/") for root in roots)


def safe_detach(name: str, roots: Iterable[Path], diskseq: int | None = None) -> bool:
    """Detach loop `name` only if, with our fd open (so its binding cannot change under us), it
    is bound to a file under `roots` (and carries `diskseq`, if given). True if cleared."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        backing = sysfs_read(f"/sys/block/{name}/loop/backing_file")
        seq = sysfs_read(f"/sys/block/{name}/diskseq")
        if backing is None or not under(backing, roots):
            return False
        if diskseq is not None and seq != str(diskseq):
            return False
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


# ---- the run's shared state -----------------------------------------------------------------


@dataclasses.dataclass
class Holding:
    """What a client was told it holds."""

    kind: str  # attach-api, attach-script, export
    backend_path: str
    source: str
    mode: str
    frontend_domid: int
    devid: int
    export: str = ""  # object path, when the client was told one
    detach_sent: bool = False  # a detach went out and got no answer: it may have happened


@dataclasses.dataclass
class Run:
    stack: Stack
    rng: random.Random
    cycles_goal: int
    deadline: float
    pace: float
    # Daemons are (re)started on this one long-lived thread: the harness sets PR_SET_PDEATHSIG,
    # which fires when the *thread* that forked the daemon ends.
    executor: concurrent.futures.ThreadPoolExecutor
    shared_images: list[str] = dataclasses.field(default_factory=list)
    decoy_dir: Path = Path()
    cycles: int = 0
    lost_while_running: int = 0
    # Export calls that went out unanswered may have happened: the worker claims a listed
    # export nobody knows once policyd answers again (numbers are never reused, so every path
    # ever held is in `known`; a claim waits while any Export call is in flight).
    exports_in_flight: int = 0
    known: set[str] = dataclasses.field(default_factory=set)
    claimed: int = 0
    ops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    external: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    scripts: set[asyncio.subprocess.Process] = dataclasses.field(default_factory=set)
    stopping: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def done(self) -> bool:
        return (
            self.stopping.is_set()
            or self.cycles >= self.cycles_goal
            or time.monotonic() > self.deadline
        )

    def error(self, name: str) -> None:
        with self.lock:
            self.errors[name] += 1

    @property
    def image_root(self) -> Path:
        return self.stack.image_dir

    @property
    def run_roots(self) -> list[Path]:
        return [self.stack.image_dir, self.decoy_dir]


def error_name(e: BaseException) -> str:
    if isinstance(e, BlockBrokerError):
        return e.dbus_name or type(e).__name__
    return type(e).__name__


# ---- kill X / bring X back ------------------------------------------------------------------


class Target(Protocol):
    """Something the killer can SIGKILL and bring back. A systemd mode implements the same."""

    name: str

    def kill(self) -> bool:
        """SIGKILL it; False if there was nothing to kill."""
        ...

    def restore(self) -> None:
        """Bring it back and wait until it serves (blocking; run off the event loop)."""
        ...

    def healthy(self) -> bool: ...


class HarnessDaemon:
    """policyd or the broker, started by tests/harness/stack.py."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack, self.name = stack, name

    def _daemon(self) -> Daemon | None:
        return self.stack.daemons.get(self.name)

    def kill(self) -> bool:
        daemon = self._daemon()
        if daemon is None or not daemon.running():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGKILL)
        return True

    def healthy(self) -> bool:
        daemon = self._daemon()
        return daemon is not None and daemon.running()

    def restore(self) -> None:
        daemon = self.stack.daemons.pop(self.name, None)
        if daemon is not None:
            daemon.stop(self.stack.config.stop_timeout_s)  # reaps it; "exited early" is expected
        if self.name == "policyd":
            self.stack.start_policyd()
        else:
            self.stack._start_broker()  # the harness has no public broker restart (yet)


class SystemdUnit:
    """policyd or the broker as a unit of the stack's systemd user manager (StackConfig(
    systemd=True)): SIGKILL of the unit's main pid; systemd brings policyd back by itself
    (Restart=on-failure) and hands it the fd store; the broker's socket stays with systemd and
    the next connection starts a new broker. restore() only waits until it serves again."""

    def __init__(self, stack: Stack, name: str, unit: str, startup_kill_share: float = 0.0) -> None:
        self.stack, self.name, self.unit = stack, name, unit
        self.startup_kill_share = startup_kill_share
        self.rng = random.Random()
        self.killed_pid = 0
        self.just_killed = False  # restore() after the killer's kill, not the final wait
        self.startup_kills = 0

    @property
    def manager(self) -> UserManager:
        if self.stack.manager is None:
            raise StackError("the stack runs no systemd manager")
        return self.stack.manager

    def kill(self) -> bool:
        pid = self.manager.main_pid(self.unit)
        if pid == 0:  # the broker between connections, or a unit that is restarting
            return False
        self.manager.kill(self.unit, signal.SIGKILL)
        self.killed_pid, self.just_killed = pid, True
        return True

    def healthy(self) -> bool:
        if self.name == "broker":  # socket-activated: the socket unit is what must be there
            return self.manager.is_active("blockbroker-broker.socket")
        return self.manager.is_active(self.unit) and self.stack.has_owner(BUS_NAME)

    def restore(self) -> None:
        if self.name == "broker":
            return  # the next connection to the socket starts one
        deadline = time.monotonic() + 30.0
        startup_kill = self.just_killed and self.rng.random() < self.startup_kill_share
        self.just_killed = False
        while True:
            pid = self.manager.main_pid(self.unit)
            if startup_kill and pid not in (0, self.killed_pid):
                # the new policyd is reconciling (or about to): kill it there too
                time.sleep(self.rng.uniform(0.0, 0.3))
                if self.kill():
                    self.startup_kills += 1
                startup_kill = False
                continue
            if pid not in (0, self.killed_pid) and self.healthy():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{self.unit} did not come back:\n{self.manager.log_tail()}")
            time.sleep(0.05)


class BlockScripts:
    """The blockbroker-block processes the workers are running right now."""

    name = "blockscript"

    def __init__(self, run: Run) -> None:
        self.run = run

    def kill(self) -> bool:
        live = [p for p in self.run.scripts if p.returncode is None]
        if not live:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.run.rng.choice(live).send_signal(signal.SIGKILL)
        return True

    def restore(self) -> None:
        pass  # libxl spawns a new one for the next disk

    def healthy(self) -> bool:
        return True


async def killer(run: Run, targets: list[tuple[Target, float]], mean_interval: float) -> None:
    names = [t for t, _ in targets]
    weights = [w for _, w in targets]
    while not run.done():
        await sleep_unless_stopped(run, run.rng.expovariate(1.0 / mean_interval))
        if run.done():
            break
        target = run.rng.choices(names, weights)[0]
        # kill() may run systemctl: off the event loop, on the restart thread
        if not await asyncio.get_running_loop().run_in_executor(run.executor, target.kill):
            continue
        run.kills[target.name] += 1
        note("kill", target=target.name)
        await asyncio.sleep(run.rng.uniform(0.0, 0.3))  # down for a moment
        await restore(run, target)
        note("back", target=target.name)


async def restore(run: Run, target: Target) -> None:
    for attempt in range(5):
        try:
            await asyncio.get_running_loop().run_in_executor(run.executor, target.restore)
            return
        except StackError as e:
            note("restore_failed", target=target.name, attempt=attempt, error=str(e)[:200])
            await asyncio.sleep(1.0)
    raise StackError(f"could not bring {target.name} back")


async def sleep_unless_stopped(run: Run, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.stopping.wait(), seconds)


# ---- client workers -------------------------------------------------------------------------


class Worker:
    def __init__(self, run: Run, index: int, xs: XsClient) -> None:
        self.run, self.index, self.xs = run, index, xs
        self.held: list[Holding] = []
        self.rw_image = str(run.stack.make_image(f"rw-{index}.img"))
        first = 1 + index * DISKS_PER_WORKER  # xvda (disk 0) is left alone
        self.free_slots = [
            (domid, devid_of_disk(disk))
            for domid in ATTACH_DOMAINS.values()
            for disk in range(first, first + DISKS_PER_WORKER)
        ]
        self.client: AsyncClient | None = None
        self.pending: list[tuple[str, int, str]] = []  # unanswered Export: source, domid, mode
        self.last_claim = 0.0

    async def bus(self) -> AsyncClient:
        if self.client is None or not self.client.bus.connected:
            self.client = await AsyncClient.connect(self.run.stack.bus_address, CALL_TIMEOUT_S)
        return self.client

    async def call(self, what: str, fn: Callable[[AsyncClient], Awaitable[Any]]) -> Any:
        """One client call; errors are counted by name and re-raised."""
        try:
            return await fn(await self.bus())
        except BlockBrokerError as e:
            self.run.error(error_name(e))
            raise
        except Exception as e:
            self.run.error(f"{what}:{type(e).__name__}")
            raise

    async def loop(self) -> None:
        rng = self.run.rng
        while not self.run.done():
            self.run.cycles += 1
            create = len(self.held) < MAX_HOLD and (not self.held or rng.random() < 0.55)
            op = self.pick_create() if create else "detach"
            self.run.ops[op] += 1
            # errors are counted where they happen
            try:
                if self.pending and time.monotonic() - self.last_claim > CLAIM_EVERY_S:
                    await self.claim()
                await self.do(op)
            except (BlockBrokerError, OSError, StackError, TimeoutError) as e:
                if any(name in error_name(e) for name in UNAVAILABLE):
                    await asyncio.sleep(rng.uniform(*BACKOFF_S))  # policyd is away: back off
            await asyncio.sleep(rng.uniform(0, 2 * self.run.pace))

    async def claim(self, final: bool = False) -> None:
        """Find the exports of unanswered Export calls among those listed: a listed export to
        the same domain of the same source and mode that no worker ever held. In the final
        round, what is not found never happened."""
        self.last_claim = time.monotonic()
        if self.run.exports_in_flight:
            return
        listed = await self.call("list", lambda c: c.list_exports())
        if self.run.exports_in_flight:
            return  # an Export answered meanwhile may be listed before its worker holds it
        for info in listed:
            want = (info.source, info.frontend_domid, info.mode)
            if info.export in self.run.known or want not in self.pending:
                continue
            self.pending.remove(want)
            self.hold_export(info)
            self.run.claimed += 1
        if final:
            self.pending.clear()

    def pick_create(self) -> str:
        ops = ["attach-api", "attach-script", "export-ro", "export-rw", "export-rw-shared"]
        weights = [3, 2, 4, 1, 0.5]
        if not self.free_slots:
            weights[0] = weights[1] = 0
        if any(h.source == self.rw_image for h in self.held):
            weights[3] = 0
        return self.run.rng.choices(ops, weights)[0]

    async def do(self, op: str) -> None:
        rng = self.run.rng
        if op in ("attach-api", "attach-script"):
            rw = rng.random() < 0.2 and not any(h.source == self.rw_image for h in self.held)
            source = self.rw_image if rw else rng.choice(self.run.shared_images)
            await self.attach(op, source, "w" if rw else "r")
        elif op == "export-ro":
            await self.export(rng.choice(self.run.shared_images), True)
        elif op == "export-rw":
            await self.export(self.rw_image, False)
        elif op == "export-rw-shared":
            await self.export(rng.choice(self.run.shared_images), False)
        else:
            await self.detach(rng.choice(self.held))

    async def attach(self, kind: str, source: str, mode: str) -> None:
        slot = self.free_slots.pop(self.run.rng.randrange(len(self.free_slots)))
        domid, devid = slot
        try:
            be = xenstore.write_libxl_vbd(self.xs, domid, devid, source, mode)
        except StackError:
            self.free_slots.append(slot)
            self.run.error("xenstore:conflict")
            raise
        holding = Holding(kind, be, source, mode, domid, devid)
        try:
            if kind == "attach-api":
                holding.export = await self.call("attach", lambda c: c.attach(be))
            else:
                await self.script("add", be)
        except BaseException:
            # libxl runs `remove` after a failed `add` (the add may have happened unanswered)
            with contextlib.suppress(BlockBrokerError, OSError, TimeoutError):
                if kind == "attach-script":
                    await self.script("remove", be)
                else:
                    await (await self.bus()).detach_backend(be)
            self.remove_vbd(holding)
            raise
        self.held.append(holding)

    async def export(self, source: str, read_only: bool) -> None:
        domain = self.run.rng.choice(list(EXPORT_DOMAINS))
        self.run.exports_in_flight += 1
        try:
            info: ExportInfo = await self.call(
                "export", lambda c: c.export(source, domain, read_only=read_only)
            )
        except (ServiceUnavailable, TimeoutError):
            # unanswered (Export, or the GetAll after it): it may have happened
            self.pending.append((source, EXPORT_DOMAINS[domain], "r" if read_only else "w"))
            raise
        finally:
            self.run.exports_in_flight -= 1
        self.hold_export(info)

    def hold_export(self, info: ExportInfo) -> None:
        self.run.known.add(info.export)
        self.held.append(
            Holding(
                "export",
                info.backend_path,
                info.source,
                info.mode,
                info.frontend_domid,
                info.devid,
                info.export,
            )
        )

    async def detach(self, holding: Holding, final: bool = False) -> bool:
        """Detach as its kind does. True once the holding is gone (done, or lost for good)."""
        try:
            if holding.kind == "attach-api":
                await self.call("detach", lambda c: c.detach_backend(holding.backend_path))
            elif holding.kind == "attach-script":
                await self.script("remove", holding.backend_path)
            else:
                await self.call("detach", lambda c: c.detach(holding.export))
        except NotFound:  # policyd no longer knows it: lost; libxl goes on
            # Not lost if an earlier try may have reached policyd (no answer); the final
            # round's are in lost_exports already.
            if not final and not holding.detach_sent:
                self.run.lost_while_running += 1
        except (BlockBrokerError, OSError, TimeoutError) as e:
            unanswered = isinstance(e, ServiceUnavailable) and e.dbus_name != SERVICE_UNKNOWN
            holding.detach_sent |= unanswered or isinstance(e, TimeoutError)
            if not final and holding.kind != "attach-script":
                return False  # policyd or the broker is down: try again later
            # libxl ignores a failing `remove` and deletes the dir all the same
        if holding.kind != "export":
            self.remove_vbd(holding)
        self.held.remove(holding)
        return True

    def remove_vbd(self, holding: Holding) -> None:
        """What libxl does after `remove`: delete the backend and frontend dirs."""
        for path in (
            holding.backend_path,
            f"/local/domain/{holding.frontend_domid}/device/vbd/{holding.devid}",
        ):
            with contextlib.suppress(PyXSError):
                self.xs.delete(path.encode())
        self.free_slots.append((holding.frontend_domid, holding.devid))

    async def script(self, command: str, be: str) -> None:
        """Run the installed blockbroker-block as libxl does; failures raise BlockBrokerError."""
        env = self.run.stack.env()
        env.update(XENBUS_PATH=be, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
        proc = await asyncio.create_subprocess_exec(
            str(self.run.stack.config.venv / "bin/blockbroker-block"),
            command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.run.scripts.add(proc)
        try:
            _, stderr = await proc.communicate()
        finally:
            self.run.scripts.discard(proc)
        if proc.returncode == 0:
            return
        if proc.returncode == -signal.SIGKILL:
            name = "blockscript:killed"
        else:  # "blockbroker-block add <path>: <name>: <message>"
            parts = stderr.decode(errors="replace").split(": ")
            name = parts[1] if len(parts) > 2 else f"blockscript:exit-{proc.returncode}"
        self.run.error(name)
        raise BlockBrokerError(stderr.decode(errors="replace").strip(), name)

    async def release_all(self) -> None:
        for holding in list(self.held):
            await self.detach(holding, final=True)
        if self.client is not None:
            await self.client.close()


# ---- loop devices of other programs ---------------------------------------------------------


async def run_cmd(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def polite_user(run: Run, decoy: str) -> None:
    """`losetup -f --show FILE`, use it a while, detach it (only while it is still ours)."""
    while not run.stopping.is_set():
        status, out = await run_cmd("losetup", "-f", "--show", decoy)
        run.external[f"polite-bind-{'ok' if status == 0 else 'fail'}"] += 1
        if status == 0 and out.startswith("/dev/loop"):
            name = out.removeprefix("/dev/")
            seq = diskseq_of(name)
            await sleep_unless_stopped(run, run.rng.uniform(0.1, 1.0))
            safe_detach(name, [run.decoy_dir], seq)
        await sleep_unless_stopped(run, run.rng.uniform(0.1, 0.6))


async def sloppy_user(run: Run, decoy: str) -> None:
    """The two-step `losetup -f` then `losetup /dev/loopN FILE` of old scripts."""
    while not run.stopping.is_set():
        status, out = await run_cmd("losetup", "-f")
        if status == 0 and out.startswith("/dev/loop"):
            await asyncio.sleep(run.rng.uniform(0.0, 0.05))  # the window between the steps
            status, _ = await run_cmd("losetup", out, decoy)
            run.external[f"sloppy-bind-{'ok' if status == 0 else 'fail'}"] += 1
            if status == 0:
                name = out.removeprefix("/dev/")
                seq = diskseq_of(name)
                await sleep_unless_stopped(run, run.rng.uniform(0.1, 1.0))
                safe_detach(name, [run.decoy_dir], seq)
        await sleep_unless_stopped(run, run.rng.uniform(0.1, 0.6))


async def cleanup_tool(run: Run, decoy: str) -> None:
    """Detaches a loop device bound to a run file and binds it to that file again; binds an
    unbound one to a decoy. Its own bindings it detaches on its next round."""
    mine: list[tuple[str, int | None]] = []
    while not run.stopping.is_set():
        await sleep_unless_stopped(run, run.rng.uniform(0.5, 1.5))
        for name, seq in mine:
            safe_detach(name, run.run_roots, seq)
        mine.clear()
        if run.stopping.is_set():
            break
        bound = {loop.name: loop.backing_file for loop in loops.loops_under(run.run_roots)}
        present = [p.name for p in Path("/sys/block").glob("loop*")]
        unbound = [n for n in present if sysfs_read(f"/sys/block/{n}/loop/backing_file") is None]
        if bound and (not unbound or run.rng.random() < 0.7):
            name = run.rng.choice(sorted(bound))
            backing = bound[name].removesuffix(loops.DELETED_SUFFIX)
            if safe_detach(name, run.run_roots):
                run.external["cleanup-detach"] += 1
                await asyncio.sleep(run.rng.uniform(0.0, 0.05))
                status, _ = await run_cmd("losetup", f"/dev/{name}", backing)
                run.external[f"cleanup-rebind-{'ok' if status == 0 else 'fail'}"] += 1
                if status == 0:
                    mine.append((name, diskseq_of(name)))
        elif unbound:
            name = run.rng.choice(unbound)
            status, _ = await run_cmd("losetup", f"/dev/{name}", decoy)
            run.external[f"cleanup-bind-{'ok' if status == 0 else 'fail'}"] += 1
            if status == 0:
                mine.append((name, diskseq_of(name)))
    for name, seq in mine:
        safe_detach(name, run.run_roots, seq)


# ---- invariants and the blkback stand-in ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    path: str
    frontend_domid: int
    devid: int
    params: str
    mode: str
    physical_device: str
    diskseq: str
    state: str


class XsReader:
    """Reads the managed backends (params under `image_root`) on one XenStore connection."""

    def __init__(self, xs: XsClient, image_root: Path) -> None:
        self.xs, self.image_root = xs, image_root

    def read(self, path: str) -> str:
        try:
            return bytes(self.xs.read(path.encode())).decode()
        except PyXSError:  # ENOENT
            return ""

    def ls(self, path: str) -> list[str]:
        try:
            return [bytes(c).decode() for c in self.xs.list(path.encode())]
        except PyXSError:
            return []

    def backends(self) -> list[Backend]:
        found = []
        base = "/local/domain/0/backend/vbd"
        for fe in self.ls(base):
            for devid in self.ls(f"{base}/{fe}"):
                path = f"{base}/{fe}/{devid}"
                params = self.read(f"{path}/params")
                if under(params, [self.image_root]):
                    found.append(self.backend(path, int(fe), int(devid), params))
        return found

    def backend(self, path: str, fe: int, devid: int, params: str) -> Backend:
        return Backend(
            path,
            fe,
            devid,
            params,
            self.read(f"{path}/mode"),
            self.read(f"{path}/physical-device"),
            self.read(f"{path}/diskseq"),
            self.read(f"{path}/state"),
        )


class Checker:
    """Walks the managed backends every CHECK_INTERVAL_S on its own XenStore connection (its
    own thread); counts invariant breaks and plays blkback."""

    def __init__(self, run: Run, blkback_share: float) -> None:
        self.run = run
        self.blkback_share = blkback_share
        self.xs = XsClient(unix_socket_path=str(run.stack.xenstore_path))
        self.xs.connect()
        self.reader = XsReader(self.xs, run.image_root)
        self.wrong: set[tuple[str, str, str]] = set()
        self.duplicates: set[tuple[str, str, int]] = set()  # (file, loop device, diskseq)
        self.rw_shared: set[tuple[str, str, str]] = set()  # (file, rw backend, diskseq)
        self.blkback: dict[str, tuple[int, str, str]] = {}  # backend -> (fd, device, diskseq)
        self.blkback_skip: set[tuple[str, str, str]] = set()
        self.blkback_opens = 0
        self.passes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="chaos-checker", daemon=True)
        self.failure: BaseException | None = None

    def _main(self) -> None:
        try:
            while not self.stop.is_set():
                self.check_once()
                self.stop.wait(CHECK_INTERVAL_S)
        except BaseException as e:  # reported by the main thread
            self.failure = e
        finally:
            for path in list(self.blkback):
                self.blkback_release(path)

    def check_once(self) -> None:
        self.passes += 1
        backends = self.reader.backends()
        good: list[tuple[Backend, str]] = []
        for be in backends:
            if not be.physical_device or not be.diskseq:
                continue
            verdict = self.verify(be)
            if verdict is None:
                continue  # changed while we looked
            if verdict:
                good.append((be, verdict))
        self.check_sharing(good)
        self.play_blkback(backends, {be.path for be, _ in good})

    def verify(self, be: Backend) -> str | None:
        """The device name if be's node names its file with its diskseq; "" if it names
        anything else while the node stays as it was; None if the node changed meanwhile."""
        try:
            major, minor = (int(x, 16) for x in be.physical_device.split(":"))
            diskseq = int(be.diskseq, 16)
        except ValueError:
            return "" if self._confirm_wrong(be, "unparsable") else None
        binding = device_binding(major, minor)
        if binding is not None:
            name, backing, seq = binding
            if backing == os.path.realpath(be.params) and seq == diskseq:
                return name
        why = "no such device" if binding is None else f"{binding[0]} {binding[1]} {binding[2]}"
        return "" if self._confirm_wrong(be, why) else None

    def _confirm_wrong(self, be: Backend, why: str) -> bool:
        params = self.reader.read(f"{be.path}/params")
        again = self.reader.backend(be.path, be.frontend_domid, be.devid, params)
        if (again.params, again.physical_device, again.diskseq) != (
            be.params,
            be.physical_device,
            be.diskseq,
        ):
            return False
        key = (be.path, be.physical_device, be.diskseq)
        if key not in self.wrong:
            self.wrong.add(key)
            note(
                "WRONG_DEVICE",
                backend=be.path,
                wants=f"{be.params}@{be.diskseq}",
                names=be.physical_device,
                found=why.replace(" ", ","),
            )
        return True

    def check_sharing(self, good: list[tuple[Backend, str]]) -> None:
        by_file: dict[str, list[tuple[Backend, str]]] = collections.defaultdict(list)
        for be, dev in good:
            by_file[os.path.realpath(be.params)].append((be, dev))
        for path, users in by_file.items():
            ro = {(dev, int(be.diskseq, 16)) for be, dev in users if be.mode == "r"}
            self.add_duplicates(path, ro)
            if len(users) < 2:
                continue
            for be, _ in users:
                key = (path, be.path, be.diskseq)
                if be.mode == "w" and key not in self.rw_shared:
                    self.rw_shared.add(key)
                    others = ",".join(sorted(b.path for b, _ in users if b is not be))
                    note("RW_WHILE_SHARED", file=path, rw=be.path, others=others)

    def add_duplicates(self, path: str, devices: set[tuple[str, int]], when: str = "") -> None:
        """Count each loop binding (device, diskseq) that was one of several for one file."""
        if len(devices) < 2:
            return
        with self.lock:  # the main thread adds the final sysfs count
            new = {(path, dev, seq) for dev, seq in devices} - self.duplicates
            self.duplicates |= new
        if new:
            shown = ",".join(f"{dev}@{seq}" for dev, seq in sorted(devices))
            note("DUPLICATE_LOOPS", file=path, devices=shown, when=when or "running")

    def play_blkback(self, backends: list[Backend], good: set[str]) -> None:
        """Open newly named devices (a share of them, as blkback does once the frontend
        connects); let go when the backend closes, goes, or names another device."""
        current = {be.path: be for be in backends}
        for path, (_, device, seq) in list(self.blkback.items()):
            be = current.get(path)
            if (
                be is None
                or be.state in ("5", "6")
                or (be.physical_device, be.diskseq)
                != (
                    device,
                    seq,
                )
            ):
                self.blkback_release(path)
        for be in backends:
            if be.path in self.blkback or be.path not in good or be.state in ("5", "6"):
                continue
            key = (be.path, be.physical_device, be.diskseq)
            if key in self.blkback_skip:
                continue
            self.blkback_skip.add(key)
            if self.run.rng.random() < self.blkback_share:
                self.blkback_open(be)

    def blkback_open(self, be: Backend) -> None:
        major, minor = (int(x, 16) for x in be.physical_device.split(":"))
        binding = device_binding(major, minor)
        if binding is None:
            return
        try:
            fd = os.open(f"/dev/{binding[0]}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        _, backing, seq = device_binding(major, minor) or ("", None, None)
        if backing != os.path.realpath(be.params) or seq != int(be.diskseq, 16):
            os.close(fd)  # rebound between the check and the open: not this backend's disk
            return
        self.blkback[be.path] = (fd, be.physical_device, be.diskseq)
        self.blkback_opens += 1
        self.run.stack.blkback_open(be.frontend_domid, be.devid, major, minor)

    def blkback_release(self, path: str) -> None:
        fd, _, _ = self.blkback.pop(path)
        fe, devid = path.rsplit("/", 2)[-2:]
        self.run.stack.blkback_close(int(fe), int(devid))
        os.close(fd)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        self.xs.close()
        if self.failure is not None:
            raise self.failure


# ---- the run --------------------------------------------------------------------------------


async def wait_serving(run: Run, targets: list[Target], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    for target in targets:  # on the restart thread: the harness's bus probe is not shared
        if not await loop.run_in_executor(run.executor, target.healthy):
            await restore(run, target)
    while not await loop.run_in_executor(run.executor, run.stack.has_owner, BUS_NAME):
        if time.monotonic() > deadline:
            raise StackError("policyd did not come back")
        await asyncio.sleep(0.05)


async def listed_exports(run: Run) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """(export, backend, source) from GetManagedObjects and (backend, source) from the CLI."""
    async with await AsyncClient.connect(run.stack.bus_address, CALL_TIMEOUT_S) as client:
        exports = await client.list_exports()
    api = {(e.export, e.backend_path, e.source) for e in exports}
    cli = await asyncio.create_subprocess_exec(
        str(run.stack.config.venv / "bin/blockbroker"),
        "list",
        "--json",
        env=run.stack.env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await cli.communicate()
    if cli.returncode != 0:
        raise StackError(f"blockbroker list --json exited {cli.returncode}")
    rows = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return api, {(row["backend_path"], row["source"]) for row in rows}


def lost(holding: Holding, api: set[tuple[str, str, str]], cli: set[tuple[str, str]]) -> bool:
    """Not listed with its backend and source (and its object path, when it was told one)."""
    in_api = any(
        be == holding.backend_path
        and src == holding.source
        and (not holding.export or path == holding.export)
        for path, be, src in api
    )
    return not in_api or (holding.backend_path, holding.source) not in cli


def loops_per_image(run: Run) -> dict[str, set[tuple[str, int]]]:
    """(loop device, diskseq) bound to each of the run's images, from sysfs."""
    found: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
    for loop in loops.loops_under([run.image_root]):
        seq = diskseq_of(loop.name)
        if seq is not None:
            found[loop.backing_file.removesuffix(loops.DELETED_SUFFIX)].add((loop.name, seq))
    return found


async def chaos(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    stack = run.stack
    started = time.monotonic()
    run.shared_images = [str(stack.make_image(f"ro-{i}.img")) for i in range(SHARED_IMAGES)]
    run.decoy_dir = stack.stack_dir / "decoys"
    run.decoy_dir.mkdir()
    decoys = []
    for i in range(3):
        decoy = run.decoy_dir / f"decoy-{i}.img"
        with open(decoy, "wb") as f:
            f.truncate(1 << 20)
        decoys.append(str(decoy))
    xs = XsClient(unix_socket_path=str(stack.xenstore_path))
    xs.connect()
    workers = [Worker(run, i, xs) for i in range(args.workers)]
    daemons: list[Target]
    if args.mode == "systemd":
        policyd = SystemdUnit(stack, "policyd", Stack.POLICYD_UNIT, args.startup_kill_share)
        daemons = [SystemdUnit(stack, "broker", "blockbroker-broker.service"), policyd]
    else:
        daemons = [HarnessDaemon(stack, "broker"), HarnessDaemon(stack, "policyd")]
    targets: list[tuple[Target, float]] = [
        (daemons[1], 0.5),
        (daemons[0], 0.25),
        (BlockScripts(run), 0.25),
    ]
    checker = Checker(run, args.blkback_share)
    checker.start()

    async def progress() -> None:
        while not run.done():
            await sleep_unless_stopped(run, PROGRESS_EVERY_S)
            note(
                "progress",
                cycles=run.cycles,
                seconds=f"{time.monotonic() - started:.0f}",
                kills=sum(run.kills.values()),
                held=sum(len(w.held) for w in workers),
                wrong_device=len(checker.wrong),
                duplicates=len(checker.duplicates),
                errors=sum(run.errors.values()),
                load=f"{os.getloadavg()[0]:.2f}",
            )

    externals = [
        asyncio.create_task(polite_user(run, decoys[0])),
        asyncio.create_task(sloppy_user(run, decoys[1])),
        asyncio.create_task(cleanup_tool(run, decoys[2])),
    ]
    chaos_tasks = [
        *(asyncio.create_task(w.loop()) for w in workers),
        asyncio.create_task(killer(run, targets, args.kill_interval)),
        asyncio.create_task(progress()),
    ]
    try:
        for task in asyncio.as_completed(chaos_tasks):
            await task  # workers end at the goal; then stop the rest
            run.stopping.set()
        chaos_seconds = time.monotonic() - started
        note("quiescing", cycles=run.cycles)
        await asyncio.gather(*externals)
        await wait_serving(run, daemons)
        await asyncio.sleep(SETTLE_S)
        for w in workers:
            await w.claim(final=True)
        api, cli = await listed_exports(run)
        held_backends = {h.backend_path for w in workers for h in w.held}
        unclaimed = sorted(p for p, be, _ in api if p not in run.known and be not in held_backends)
        for path in unclaimed:
            note("UNCLAIMED_EXPORT", export=path)
        lost_list = [h for w in workers for h in w.held if lost(h, api, cli)]
        for h in lost_list:
            note("LOST_EXPORT", kind=h.kind, export=h.export, backend=h.backend_path)
        for path, devices in loops_per_image(run).items():
            if path in run.shared_images:
                checker.add_duplicates(path, devices, "before-final-detach")
        held_at_end = sum(len(w.held) for w in workers)
        for w in workers:
            await w.release_all()
        await asyncio.sleep(0.5)  # the checker sees the last detaches
        checker.finish()  # blkback lets go of everything it still holds
        stale = XsReader(xs, run.image_root).backends()
        for be in stale:
            note("STALE_BACKEND", backend=be.path, physical_device=be.physical_device)
            for path in (be.path, f"/local/domain/{be.frontend_domid}/device/vbd/{be.devid}"):
                with contextlib.suppress(PyXSError):
                    xs.delete(path.encode())
    finally:
        run.stopping.set()
        for task in [*externals, *chaos_tasks]:
            task.cancel()
        await asyncio.gather(*externals, *chaos_tasks, return_exceptions=True)
        if checker.thread.is_alive():
            checker.finish()
        xs.close()
    leaked = loops.leaked_loops([run.image_root], SETTLE_S)
    for loop in leaked:
        note("LEAKED_LOOP", device=loop.path, file=loop.backing_file)
    seconds = time.monotonic() - started
    return {
        "cycles": run.cycles,
        "kills": sum(run.kills.values()),
        "kills_by_kind": dict(run.kills),
        "wrong_device": len(checker.wrong),
        "leaked_loops": len(leaked),
        "lost_exports": len(lost_list),
        "lost_while_running": run.lost_while_running,
        "duplicate_loops": len(checker.duplicates),
        "rw_while_shared": len(checker.rw_shared),
        "stale_backends": len(stale),
        "unclaimed_exports": len(unclaimed),
        "claimed_after_no_reply": run.claimed,
        "policyd_startup_kills": getattr(daemons[1], "startup_kills", 0),
        "mode": args.mode,
        "held_at_end": held_at_end,
        "seconds": round(seconds, 1),
        "chaos_seconds": round(chaos_seconds, 1),
        "ms_per_cycle": round(chaos_seconds * 1e3 / max(run.cycles, 1), 2),
        "ops": dict(run.ops),
        "errors": dict(run.errors),
        "external": dict(run.external),
        "blkback_opens": checker.blkback_opens,
        "checker_passes": checker.passes,
        "workers": args.workers,
        "seed": args.seed,
    }


RECONCILE_FIELDS = ("stored_fds", "adopted", "reopened", "failed", "released_fds")


def policyd_log_summary(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """From policyd's log: the sums of its start-up reconciliations' counts (and how many
    there were), and how often each warning or error message was logged."""
    import shlex

    reconciled: collections.Counter[str] = collections.Counter()
    problems: collections.Counter[str] = collections.Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}, {}
    for line in text.splitlines():
        if not line.startswith("component=policyd "):
            continue
        try:
            fields = dict(f.split("=", 1) for f in shlex.split(line) if "=" in f)
        except ValueError:
            continue
        if fields.get("msg") == "reconciled":
            reconciled["starts"] += 1
            for name in RECONCILE_FIELDS:
                reconciled[name] += int(fields.get(name, "0") or 0)
        elif fields.get("level") in ("warning", "error"):
            problems[f"{fields['level']}: {fields.get('msg', '')}"] += 1
    return dict(reconciled), dict(problems)


INVARIANTS = (
    "wrong_device",
    "leaked_loops",
    "lost_exports",
    "lost_while_running",
    "duplicate_loops",
    "rw_while_shared",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=int(env("CYCLES", "10000")))
    p.add_argument("--workers", type=int, default=int(env("CHAOS_WORKERS", "4")))
    p.add_argument("--max-seconds", type=float, default=float(env("CHAOS_MAX_SECONDS", "3600")))
    p.add_argument("--kill-interval", type=float, default=float(env("CHAOS_KILL_INTERVAL", "1")))
    p.add_argument("--pace", type=float, default=float(env("CHAOS_PACE", "0.02")))
    p.add_argument("--blkback-share", type=float, default=float(env("CHAOS_BLKBACK_SHARE", "0.6")))
    p.add_argument(
        "--mode",
        choices=("systemd", "harness"),
        default=env("CHAOS_MODE", "systemd"),
        help="systemd: the daemons are units of a real systemd user manager (fd store, "
        "Restart=, socket activation); harness: the harness restarts them (no fd store)",
    )
    p.add_argument(
        "--startup-kill-share",
        type=float,
        default=float(env("CHAOS_STARTUP_KILL_SHARE", "0.2")),
        help="systemd mode: share of policyd kills followed by a kill of the new policyd "
        "while it starts (reconciles)",
    )
    p.add_argument("--seed", type=int, default=int(env("CHAOS_SEED", str(time.time_ns() % 10**6))))
    args = p.parse_args(argv)
    if not 1 <= args.workers <= 3 * 16 // DISKS_PER_WORKER - 1:
        p.error(f"--workers must be 1..{3 * 16 // DISKS_PER_WORKER - 1}")
    if args.cycles < 1 or args.max_seconds <= 0 or args.kill_interval <= 0:
        p.error("--cycles, --max-seconds and --kill-interval must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("chaos: needs root (loop devices, the host stack)", file=sys.stderr)
        return 2
    note("start", cycles=args.cycles, workers=args.workers, seed=args.seed, mode=args.mode)
    config = StackConfig(
        domains={**ATTACH_DOMAINS, **EXPORT_DOMAINS},
        sysfs_blkback=True,
        systemd=args.mode == "systemd",
        keep_stack_dir=bool(os.environ.get("CHAOS_KEEP_STACK_DIR")),  # logs, for a post-mortem
    )
    # the daemons and blockbroker-block of the venv running this script, unless told otherwise
    config.venv = Path(os.environ.get("BLOCKBROKER_VENV", sys.prefix))
    stack = Stack(config)
    stack.start()
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chaos-restart")
    try:
        run = Run(
            stack,
            random.Random(args.seed),
            args.cycles,
            time.monotonic() + args.max_seconds,
            args.pace,
            executor,
        )
        result = asyncio.run(chaos(run, args))
    finally:
        reconciled, logged = policyd_log_summary(stack.log_path("policyd"))
        problems = stack.stop()
        executor.shutdown()
    result["teardown_problems"] = problems
    result["reconciled"] = reconciled
    result["policyd_logged"] = logged
    bad = {k: result[k] for k in INVARIANTS if result[k]}
    note("done", **(bad or {"invariants": "held"}))
    print("CHAOS " + json.dumps(result, sort_keys=True), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
