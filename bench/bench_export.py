"""Benchmark: Export end to end over D-Bus, and a cached (shared) read-only Export.

Runs as root (make bench) against the real host stack from tests/harness (real oxenstored, private
system bus with the project's policy, broker, policyd as user blockbroker). One client connection
(dbus-fast) calls, and times:
  export (fresh)       Export of a file no one exports: broker LOOP_FILE + one XenStore
                       transaction with the FE+BE nodes and the physical-device trio
  export (cached ro)   Export of a file already exported read-only elsewhere: the held loop
                       device is shared, no broker call
  detach               Export.Detach() (nodes removed in one transaction, fd closed)
Measurement only; every export is checked (reply is an object path) but not timed beyond that.
Prints a table, then `BENCH_RESULT {json}` last. BENCH_N (default 200) sets iterations.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dbus_fast import Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from harness.stack import Stack, StackConfig  # noqa: E402

N = int(os.environ.get("BENCH_N", "200"))
WARMUP = 5
MANAGER = "/org/qubes/BlockBroker1"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(pct(values, 0.99) * 1e3, 3),
        "max_ms": round(max(values) * 1e3, 3),
    }


async def call(bus: MessageBus, member: str, sig: str, body: list[Any], **kw: str) -> Any:
    reply = await bus.call(
        Message(
            destination="org.qubes.BlockBroker1",
            path=kw.get("path", MANAGER),
            interface=kw.get("iface", "org.qubes.BlockBroker1.Manager"),
            member=member,
            signature=sig,
            body=body,
        )
    )
    if reply.message_type is not MessageType.METHOD_RETURN:
        raise RuntimeError(f"{member}: {reply.error_name} {reply.body}")
    return reply.body[0] if reply.body else None


async def detach(bus: MessageBus, export: str) -> None:
    await call(bus, "Detach", "", [], path=export, iface="org.qubes.BlockBroker1.Export")


async def run(stack: Stack) -> dict[str, list[float]]:
    bus = await MessageBus(bus_address=stack.bus_address).connect()
    fresh_image = stack.make_image("bench-fresh.img")
    shared_image = stack.make_image("bench-shared.img")
    times: dict[str, list[float]] = {"export_fresh": [], "export_cached_ro": [], "detach": []}
    ro = {"read-only": Variant("b", True)}
    anchor = await call(bus, "Export", "ssa{sv}", [str(shared_image), "untrusted", ro])
    for i in range(WARMUP + N):
        t0 = time.perf_counter()
        export = await call(bus, "Export", "ssa{sv}", [str(fresh_image), "work", ro])
        t1 = time.perf_counter()
        await detach(bus, export)
        t2 = time.perf_counter()
        cached = await call(bus, "Export", "ssa{sv}", [str(shared_image), "work", ro])
        t3 = time.perf_counter()
        await detach(bus, cached)
        if i >= WARMUP:
            times["export_fresh"].append(t1 - t0)
            times["detach"].append(t2 - t1)
            times["export_cached_ro"].append(t3 - t2)
    await detach(bus, anchor)
    bus.disconnect()
    return times


def main() -> int:
    with Stack(StackConfig(domains={"work": 1, "untrusted": 2})) as stack:
        times = asyncio.run(run(stack))
    result = {name: summary(values) for name, values in times.items()}
    print(f"{'operation':<20} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, s in result.items():
        print(f"{name:<20} {s['n']:>5} {s['p50_ms']:>9} {s['p99_ms']:>9} {s['max_ms']:>9}")
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
