"""Benchmark: Export end to end over D-Bus, and a cached (shared) read-only Export.

Runs as root (make bench) against the real host stack from tests/harness (real oxenstored, private
system bus with the project's policy, broker, policyd as user blockbroker). One client connection
(dbus-fast) calls, and times:
  export (fresh)       Export of a file no one exports: broker LOOP_FILE + one XenStore
                       transaction with the FE+BE nodes and the physical-device trio
  export (cached ro)   Export of a file already exported read-only elsewhere: the held loop
                       device is shared, no broker call
  detach               Export.Detach() (nodes removed in one transaction, fd closed)
  attach               Manager.Attach(backend path) of a vbd libxl-style nodes were written for
                       (writing them is not timed): what blockbroker-block add waits for
  detach (backend)     Manager.Detach(backend path): what blockbroker-block remove waits for
Measurement only; every export is checked (reply is an object path) but not timed beyond that.
All five run interleaved (one of each per round), so load on the shared machine hits them alike;
the load average is printed with the table. Prints a table, then `BENCH_RESULT {json}` last.
BENCH_N (default 200) sets iterations; BENCH_KEEP_LOG=<file> copies policyd's log there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchstats import call, summary  # noqa: E402
from dbus_fast import Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from harness import xenstore  # noqa: E402
from harness.names import EXPORT_IFACE  # noqa: E402
from harness.stack import Stack, StackConfig  # noqa: E402

N = int(os.environ.get("BENCH_N", "200"))
WARMUP = 5
ATTACH_FE, ATTACH_DEVID = 1, 51728  # xvdb in domain "work"


async def detach(bus: MessageBus, export: str) -> None:
    await call(bus, "Detach", "", [], path=export, iface=EXPORT_IFACE)


def write_libxl_vbd(stack: Stack, params: str) -> str:
    """The backend/frontend nodes libxl's device_disk_add writes before it runs the script."""
    return xenstore.write_libxl_vbd(stack.xs, ATTACH_FE, ATTACH_DEVID, params)


def remove_libxl_vbd(stack: Stack, be: str) -> None:
    for path in (be, f"/local/domain/{ATTACH_FE}/device/vbd/{ATTACH_DEVID}"):
        if stack.xs_exists(path):
            stack.xs_rm(path)


NAMES = ("export_fresh", "export_cached_ro", "detach", "attach", "detach_backend")
Times = dict[str, list[float]]


class Candidate:
    """One stack (one policyd install) and an open client connection to it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.times: Times = {name: [] for name in NAMES}
        self.ro = {"read-only": Variant("b", True)}

    async def start(self) -> None:
        self.bus = await MessageBus(bus_address=self.stack.bus_address).connect()
        self.fresh = str(self.stack.make_image("bench-fresh.img"))
        self.shared = str(self.stack.make_image("bench-shared.img"))
        self.attach_image = str(self.stack.make_image("bench-attach.img"))
        args = [self.shared, "untrusted", self.ro]
        self.anchor = await call(self.bus, "Export", "ssa{sv}", args)

    async def iteration(self, record: bool) -> None:
        bus, ro = self.bus, self.ro
        t0 = time.perf_counter()
        export = await call(bus, "Export", "ssa{sv}", [self.fresh, "work", ro])
        t1 = time.perf_counter()
        await detach(bus, export)
        t2 = time.perf_counter()
        cached = await call(bus, "Export", "ssa{sv}", [self.shared, "work", ro])
        t3 = time.perf_counter()
        await detach(bus, cached)
        be = write_libxl_vbd(self.stack, self.attach_image)
        t4 = time.perf_counter()
        await call(bus, "Attach", "s", [be])
        t5 = time.perf_counter()
        await call(bus, "Detach", "s", [be])
        t6 = time.perf_counter()
        remove_libxl_vbd(self.stack, be)
        if record:
            for name, dt in zip(NAMES, (t1 - t0, t3 - t2, t2 - t1, t5 - t4, t6 - t5), strict=True):
                self.times[name].append(dt)

    async def stop(self) -> None:
        await detach(self.bus, self.anchor)
        self.bus.disconnect()


async def run(candidates: list[Candidate]) -> None:
    """One iteration of each candidate per round, so load hits them alike."""
    for c in candidates:
        await c.start()
    for i in range(WARMUP + N):
        for c in candidates:
            await c.iteration(i >= WARMUP)
    for c in candidates:
        await c.stop()


def report(label: str, times: Times) -> dict[str, dict[str, float]]:
    result = {name: summary(values) for name, values in times.items()}
    print(f"{label}\n{'operation':<20} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, s in result.items():
        print(f"{name:<20} {s['n']:>5} {s['p50_ms']:>9} {s['p99_ms']:>9} {s['max_ms']:>9}")
    return result


def main() -> int:
    """BENCH_VENVS=<venv>:<venv>...: compare policyd installs, interleaved (default: the
    installed one). BENCH_KEEP_LOG=<prefix>: keep each policyd's log as <prefix>.<n>.log."""
    venvs = [v for v in os.environ.get("BENCH_VENVS", "").split(":") if v]
    configs = [StackConfig(domains={"work": 1, "untrusted": 2}) for _ in venvs or [""]]
    for config, venv in zip(configs, venvs, strict=False):
        config.venv = Path(venv)
    with contextlib.ExitStack() as stacks:
        candidates = [Candidate(stacks.enter_context(Stack(config))) for config in configs]
        asyncio.run(run(candidates))
        keep = os.environ.get("BENCH_KEEP_LOG")
        for n, c in enumerate(candidates):
            if keep:
                shutil.copy(c.stack.log_path("policyd"), f"{keep}.{n}.log")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end: {load}")
    if not venvs:
        result: dict[str, object] = dict(report("installed policyd", candidates[0].times))
    else:
        result = {venv: report(venv, c.times) for venv, c in zip(venvs, candidates, strict=True)}
    result["load_average"] = load
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
