"""What the benchmarks share: percentiles, a latency summary, and a D-Bus call that must succeed.

Benchmark code, run by hand or by `make bench` as root on a test stack; not shipped.
"""

from __future__ import annotations

import statistics
from typing import Any

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus
from harness import rawbus


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank, the lower one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    """Durations in seconds as n and p50, p99, min and max in milliseconds."""
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(pct(values, 0.99) * 1e3, 3),
        "min_ms": round(min(values) * 1e3, 3),
        "max_ms": round(max(values) * 1e3, 3),
    }


async def call(bus: MessageBus, member: str, sig: str, body: list[Any], **kw: str) -> Any:
    """policyd's `member` over `bus`; its first return value; RuntimeError on an error reply."""
    reply = await rawbus.call(bus, member, sig, body, **kw)
    if reply.message_type is not MessageType.METHOD_RETURN:
        raise RuntimeError(f"{member}: {reply.error_name} {reply.body}")
    return reply.body[0] if reply.body else None
