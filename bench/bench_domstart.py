"""Domain start in the real Xen lab: `xl create` of a PV guest with 4 file-backed disks, through
Xen's stock `block` hotplug script and through blockbroker's `blockbroker-block`.

Runs as root on the host (measurement only, never a pass/fail test): boots the lab once
(xenlab/run.sh domstart) and reads its `XENLAB BENCH domstart` lines. Per variant it reports the
median `xl create -p` time; the per-disk cost is (median(4 disks) - median(no disks)) / 4, since
libxl returns only when every disk's hotplug script has finished. It also reports where dom0's
CPU went during the creates (policyd, the broker, xenstored, dbus-daemon, all of dom0's busy
time), from the scenario's `domstart-cpu` lines. See docs/benchmarks.md.

    bench/bench_domstart.py [--reps N] [--variants none,stock,blockbroker,blockbroker_nopre,floor]
    (blockbroker_nopre: the same script under another name, which policyd does not pre-attach;
    floor: a static script that only exits 0, the cost of a disk with no hotplug work at all)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISKS = 4
BENCH_LINE = re.compile(
    r"^XENLAB BENCH domstart variant=(?P<variant>\w+) rep=(?P<rep>\d+) "
    r"(?:create_ms=(?P<ms>\d+) disks=\d+|error=(?P<error>\S+))"
)
CPU_LINE = re.compile(
    r"^XENLAB BENCH domstart-cpu variant=(?P<variant>\w+) rep=\d+ (?P<fields>.*)$"
)
CPU_FIELDS = ("policyd", "broker", "xenstored", "dbus", "busy")
# Xen's `block` / each variant, per disk from the medians: (variant, result key, label); the
# floor's is the bound on any script's
SPEEDUPS = (
    ("blockbroker", "per_disk_speedup", "blockbroker"),
    ("blockbroker_nopre", "per_disk_speedup_no_pre_attach", "blockbroker without pre-attach"),
    ("floor", "per_disk_speedup_bound", "floor, a script that only exits 0: the bound"),
)


def default_variants() -> str:
    """blockbroker's variant only once its hotplug script is installed (`make install`)."""
    installed = Path("/opt/blockbroker/venv/bin/blockbroker-block").exists()
    return "none,floor,stock,blockbroker" if installed else "none,floor,stock"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=int(os.environ.get("DOMSTART_REPS", "5")))
    parser.add_argument("--variants", default=os.environ.get("DOMSTART_VARIANTS", ""))
    args = parser.parse_args(argv)
    variants = (args.variants or default_variants()).split(",")
    limit = 120 + 60 * args.reps * len(variants)
    cmd = [
        str(REPO / "xenlab" / "run.sh"),
        "-p",
        f"domstart.reps={args.reps}",
        "-p",
        f"domstart.variants={' '.join(variants)}",
        f"domstart={limit}",
    ]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    times: dict[str, list[int]] = {v: [] for v in variants}
    errors: list[str] = []
    cpu: dict[str, dict[str, list[int]]] = {v: {f: [] for f in CPU_FIELDS} for v in variants}
    for line in proc.stdout.splitlines():
        cpu_match = CPU_LINE.match(line.strip())
        if cpu_match and cpu_match["variant"] in cpu:
            for field in cpu_match["fields"].split():
                name, _, value = field.partition("=")
                if name in CPU_FIELDS and value.lstrip("-").isdecimal():
                    cpu[cpu_match["variant"]][name].append(int(value))
            continue
        match = BENCH_LINE.match(line.strip())
        if not match:
            continue
        print(line, flush=True)
        if match["error"]:
            errors.append(f"{match['variant']} rep {match['rep']}: {match['error']}")
        else:
            times[match["variant"]].append(int(match["ms"]))
    if proc.returncode != 0 or errors or not all(times.values()):
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        print(f"domstart: lab run failed (exit {proc.returncode}) {errors}", file=sys.stderr)
        print(tail, file=sys.stderr)
        return 1

    result: dict[str, object] = {"reps": args.reps, "disks": DISKS, "unit": "ms"}
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    for variant, ts in times.items():
        result[f"{variant}_create_ms"] = ts
        result[f"{variant}_create_median_ms"] = medians[variant]
        print(f"{variant:12} xl create -p median {medians[variant]:8.0f} ms  runs {ts}")
    per_disk: dict[str, float] = {}
    for variant in ("stock", "blockbroker", "blockbroker_nopre", "floor"):
        if variant in medians and "none" in medians:
            per_disk[variant] = (medians[variant] - medians["none"]) / DISKS
            result[f"{variant}_per_disk_ms"] = round(per_disk[variant], 1)
            print(f"{variant:12} per disk {per_disk[variant]:8.1f} ms")
    for variant, key, label in SPEEDUPS:
        if per_disk.get(variant, 0) > 0 and "stock" in per_disk:
            speedup = per_disk["stock"] / per_disk[variant]
            result[key] = round(speedup, 2)
            print(f"per-disk speedup (stock / {label}): {speedup:.2f}x")
    report_paired(times, result)
    report_cpu(cpu, result)
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


def report_paired(times: dict[str, list[int]], result: dict[str, object]) -> None:
    """Per disk, paired by round: the median of (this round's create - this round's create
    with no disks) / 4. The rounds are interleaved, so this follows the lab's drifting load
    better than a difference of two medians; the ratios to Xen's `block` from it."""
    if "none" not in times:
        return
    paired: dict[str, float] = {}
    for variant, ts in times.items():
        if variant != "none" and len(ts) == len(times["none"]):
            diffs = [t - base for t, base in zip(ts, times["none"], strict=True)]
            paired[variant] = statistics.median(diffs) / DISKS
            result[f"{variant}_per_disk_paired_ms"] = round(paired[variant], 1)
            print(f"{variant:12} per disk, paired by round {paired[variant]:8.1f} ms")
    for variant, ms in paired.items():
        if variant != "stock" and ms > 0 and "stock" in paired:
            ratio = paired["stock"] / ms
            result[f"{variant}_speedup_paired"] = round(ratio, 2)
            print(f"paired per-disk ratio stock / {variant}: {ratio:.2f}x")


def report_cpu(cpu: dict[str, dict[str, list[int]]], result: dict[str, object]) -> None:
    """Where dom0's CPU went: per variant, the median CPU ms of each daemon during a create,
    and per disk, (median - the no-disk median) / 4."""
    medians = {
        v: {f: statistics.median(ts) for f, ts in fields.items() if ts} for v, fields in cpu.items()
    }
    base = medians.get("none", {})
    for variant, fields in medians.items():
        if not fields:
            continue
        result[f"{variant}_cpu_median_ms"] = fields
        row = "  ".join(f"{f} {fields[f]:6.0f}" for f in CPU_FIELDS if f in fields)
        print(f"{variant:12} dom0 CPU ms per create (median): {row}")
        if variant != "none" and base:
            per_disk = {f: round((fields[f] - base[f]) / DISKS, 1) for f in fields if f in base}
            result[f"{variant}_cpu_per_disk_ms"] = per_disk
            row = "  ".join(f"{f} {ms:6.1f}" for f, ms in per_disk.items())
            print(f"{variant:12} dom0 CPU ms per disk: {row}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
