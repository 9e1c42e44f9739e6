"""Benchmark: policyd with a thousand live exports over a hundred domains.

Runs as root (make bench) against the real host stack from tests/harness (real oxenstored,
private system bus, broker, policyd as user blockbroker), with BENCH_DOMAINS (default 100)
guests registered in XenStore as libxl does. Exports of read-only images (one sparse file and
so one loop device each) are added round-robin over the domains up to each checkpoint in
BENCH_CHECKPOINTS (default 1,100,500,1000); at each checkpoint it measures, one client
connection (dbus-fast):
  rss_mb             policyd's VmRSS from /proc/PID/status
  export             Export of a fresh image + its Detach, the Export timed (BENCH_N rounds),
                     interleaved with the same on a second stack that has one export
                     (export_baseline): their ratio is export_vs_baseline
  managed_objects    ObjectManager.GetManagedObjects on the Manager (what `list` reads)
  list_api           client.api.AsyncClient.list_exports() over an open connection
  list_cli           `blockbroker list --json` as a process (Python start-up included)
Then start-up reconciliation of every export, twice:
  reconcile_reopen   policyd stopped and started as a plain process (no fd store): the
                     degraded path re-opens each device through the broker. A loop device
                     nobody holds is freed (AUTOCLEAR) when policyd dies, so this process
                     holds each one open read-only meanwhile, as blkback would.
  reconcile_empty    the same restart with no exports (policyd's own start-up cost)
The time is from spawning policyd to its name on the bus (what clients wait for).
With BENCH_SYSTEMD=1 a second stack runs policyd under a real systemd user manager
(harness.systemd) and times `systemctl restart` with the fd store holding every fd.
Every export is detached at the end and the stack's teardown checks no loop device is left.
Prints a table, then `BENCH_RESULT {json}` last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchstats import call, summary  # noqa: E402
from dbus_fast import Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from harness.names import EXPORT_IFACE, MANAGER, OM_IFACE  # noqa: E402
from harness.stack import Stack, StackConfig  # noqa: E402

N = int(os.environ.get("BENCH_N", "60"))
DOMAINS = int(os.environ.get("BENCH_DOMAINS", "100"))
CHECKPOINTS = [int(x) for x in os.environ.get("BENCH_CHECKPOINTS", "1,100,500,1000").split(",")]
LIST_N = int(os.environ.get("BENCH_LIST_N", "15"))
NOFILE = 4096  # as dbus/blockbroker-policyd.service's LimitNOFILE=


def policyd_pid(stack: Stack) -> int:
    if stack.manager is not None:
        out = stack.systemctl("show", "-p", "MainPID", "--value", Stack.POLICYD_UNIT)
        return int(out.stdout.strip())
    return stack.daemons["policyd"].pid


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match
    return round(int(match.group(1)) / 1024, 1)


class Scale:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.domains = [f"d{i:03d}" for i in range(1, DOMAINS + 1)]
        self.ro = {"read-only": Variant("b", True)}
        self.exports: list[str] = []
        self.images: list[str] = []

    async def connect(self) -> None:
        self.bus = await MessageBus(bus_address=self.stack.bus_address).connect()

    async def grow(self, target: int) -> float:
        """Export images until `target` exports are live; returns the seconds it took."""
        t0 = time.perf_counter()
        while len(self.exports) < target:
            i = len(self.exports)
            if i >= len(self.images):
                self.images.append(str(self.stack.make_image(f"scale-{i:04d}.img", 1 << 16)))
            dom = self.domains[i % len(self.domains)]
            path = await call(self.bus, "Export", "ssa{sv}", [self.images[i], dom, self.ro])
            self.exports.append(path)
        return time.perf_counter() - t0

    async def shrink(self) -> None:
        while self.exports:
            path = self.exports.pop()
            await call(self.bus, "Detach", "", [], path=path, iface=EXPORT_IFACE)

    async def probe_export(self, i: int) -> float:
        """Export of a fresh image (then detached): the seconds the Export took."""
        probe = str(self.stack.make_image("scale-probe.img", 1 << 16))
        dom = self.domains[i % len(self.domains)]
        t0 = time.perf_counter()
        path = await call(self.bus, "Export", "ssa{sv}", [probe, dom, self.ro])
        dt = time.perf_counter() - t0
        await call(self.bus, "Detach", "", [], path=path, iface=EXPORT_IFACE)
        return dt

    async def export_times(self, baseline: Scale) -> tuple[list[float], list[float]]:
        """The probe Export here and on `baseline` (a stack with one export), one of each per
        round, so the machine's load hits both alike."""
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(N + 3):
            pair = (await self.probe_export(i), await baseline.probe_export(i))
            if i >= 3:
                for values, dt in zip(times, pair, strict=True):
                    values.append(dt)
        return times

    async def managed_objects_times(self) -> tuple[list[float], int]:
        times, count = [], 0
        for _ in range(LIST_N):
            t0 = time.perf_counter()
            objects = await call(
                self.bus, "GetManagedObjects", "", [], path=MANAGER, iface=OM_IFACE
            )
            times.append(time.perf_counter() - t0)
            count = len(objects)
        return times, count

    async def list_api_times(self) -> list[float]:
        from client.api import AsyncClient

        times = []
        async with await AsyncClient.connect(self.stack.bus_address) as bb:
            for _ in range(LIST_N):
                t0 = time.perf_counter()
                await bb.list_exports()
                times.append(time.perf_counter() - t0)
        return times

    def list_cli_times(self) -> list[float]:
        argv = [str(self.stack.config.venv / "bin/blockbroker"), "list", "--json"]
        times = []
        for _ in range(max(3, LIST_N // 3)):
            t0 = time.perf_counter()
            done = subprocess.run(argv, env=self.stack.env(), capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
            assert len(done.stdout.splitlines()) == len(self.exports), "list missed exports"
        return times

    async def checkpoint(self, label: str, baseline: Scale) -> dict[str, Any]:
        mo, count = await self.managed_objects_times()
        here, there = await self.export_times(baseline)
        point = {
            "exports": len(self.exports),
            "rss_mb": rss_mb(policyd_pid(self.stack)),
            "export": summary(here),
            "export_baseline": summary(there),
            "managed_objects": summary(mo),
            "managed_objects_count": count,
            "list_api": summary(await self.list_api_times()),
            "list_cli": summary(self.list_cli_times()),
        }
        print(
            f"{label:>6} exports={point['exports']:>5} rss={point['rss_mb']:>6} MB "
            f"export p50={point['export']['p50_ms']:>6} p99={point['export']['p99_ms']:>6} "
            f"(1-export stack alongside: p50={point['export_baseline']['p50_ms']:>6}) "
            f"GetManagedObjects p50={point['managed_objects']['p50_ms']:>7} "
            f"list(api) p50={point['list_api']['p50_ms']:>7} "
            f"list(cli) p50={point['list_cli']['p50_ms']:>7} ms",
            flush=True,
        )
        return point

    async def grow_and_measure(self, baseline: Scale) -> list[dict[str, Any]]:
        await baseline.connect()
        try:
            await baseline.grow(1)
            points = []
            for target in CHECKPOINTS:
                grow_s = await self.grow(target)
                point = await self.checkpoint(str(target), baseline)
                point["grow_s"] = round(grow_s, 2)
                point["export_vs_baseline"] = round(
                    point["export"]["p50_ms"] / point["export_baseline"]["p50_ms"], 2
                )
                points.append(point)
            await baseline.shrink()
            return points
        finally:
            baseline.bus.disconnect()

    async def loop_devices(self) -> list[str]:
        objects = await call(self.bus, "GetManagedObjects", "", [], path=MANAGER, iface=OM_IFACE)
        return [props[EXPORT_IFACE]["LoopDevice"].value for props in objects.values()
                if EXPORT_IFACE in props]  # fmt: skip


def reconciled_line(stack: Stack) -> str:
    lines = [ln for ln in stack.log_path("policyd").read_text().splitlines() if "reconciled" in ln]
    return lines[-1] if lines else ""


def restart_plain(stack: Stack) -> float:
    problems = stack.stop_policyd()
    assert not problems, problems
    t0 = time.perf_counter()
    stack.start_policyd()
    return time.perf_counter() - t0


def restart_unit(stack: Stack) -> float:
    t0 = time.perf_counter()
    stack.restart_policyd()  # one restart job: the fd store keeps the fds
    return time.perf_counter() - t0


def restarts(stack: Stack, restart: Any, what: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        times.append(restart(stack))
        print(f"{what}: {times[-1]:.3f} s  {reconciled_line(stack)}", flush=True)
    return times


async def session(scale: Scale, work: Any) -> Any:
    """Run `work` on a fresh connection (each asyncio.run has its own loop; the harness's
    restarts run its own loop, so they happen between sessions)."""
    await scale.connect()
    try:
        return await work()
    finally:
        scale.bus.disconnect()


def run_stack(result: dict[str, Any], systemd: bool) -> None:
    config = StackConfig(domains={f"d{i:03d}": i for i in range(1, DOMAINS + 1)}, systemd=systemd)
    key = "fdstore" if systemd else "reopen"
    restart = restart_unit if systemd else restart_plain
    count = int(os.environ.get("BENCH_RESTARTS", "3"))
    with Stack(config) as stack:
        scale = Scale(stack)
        try:
            if systemd:
                asyncio.run(session(scale, lambda: scale.grow(CHECKPOINTS[-1])))
                result["systemd_rss_mb"] = rss_mb(policyd_pid(stack))
            else:  # a second stack with one export: the Export baseline, measured alongside
                small = StackConfig(domains={f"d{i:03d}": i for i in range(1, DOMAINS + 1)})
                with Stack(small) as other:
                    baseline = Scale(other)
                    measure = lambda: scale.grow_and_measure(baseline)  # noqa: E731
                    result["points"] = asyncio.run(session(scale, measure))
            devices = asyncio.run(session(scale, scale.loop_devices))
            # without a store, a loop device nobody holds is freed when policyd dies: hold
            # each one open read-only meanwhile, as blkback would
            held = [] if systemd else [os.open(d, os.O_RDONLY | os.O_CLOEXEC) for d in devices]
            try:
                times = restarts(stack, restart, f"restart with {len(devices)} exports", count)
            finally:
                for fd in held:
                    os.close(fd)
            result[f"reconcile_{key}"] = summary(times)
            result[f"reconcile_{key}_log"] = reconciled_line(stack)
            after = asyncio.run(session(scale, scale.loop_devices))
            assert sorted(after) == sorted(devices), "exports lost or changed in the restart"
        finally:
            asyncio.run(session(scale, scale.shrink))
        result[f"reconcile_{key}_empty"] = summary(
            restarts(stack, restart, "restart, empty", count)
        )


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(NOFILE, hard)), hard))
    result: dict[str, Any] = {}
    run_stack(result, systemd=False)
    if os.environ.get("BENCH_SYSTEMD") == "1":
        run_stack(result, systemd=True)
    points = result["points"]
    last = points[-1]
    result["export_ratio"] = last["export_vs_baseline"]
    result["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Export p50 at {last['exports']} exports vs a 1-export stack alongside: "
        f"{result['export_ratio']}x; reconcile (re-open) p50 "
        f"{result['reconcile_reopen']['p50_ms']} ms, "
        f"empty {result['reconcile_reopen_empty']['p50_ms']} ms"
    )
    print(f"load average at the end: {result['load_average']}")
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
