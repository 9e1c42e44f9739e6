"""Benchmark: a boot storm, BENCH_STORM_DOMAINS (20) domains with BENCH_STORM_DISKS (4) disks
each, every disk's `blockbroker-block add` started at once.

Runs as root (make bench) against the real host stack from tests/harness (real oxenstored,
private system bus, broker, policyd as user blockbroker). Each round: the nodes libxl's
device_disk_add writes are written for every disk (untimed; libxl writes them before it spawns
the script), then every `add` is spawned (posix_spawn, XENBUS_* as libxl sets them) without
waiting, and each one's time is from its own spawn to its exit. A disk counts as attached
when its `add` exited 0 and its backend has physical-device and hotplug-status = connected.
Then every `remove` is spawned at once the same way, and the nodes are deleted. Images are
distinct read-only files (one loop device each). BENCH_STORM_ROUNDS (5) rounds; per-disk p50
and p99 over all of them, and each round's wall time (first spawn to last exit).
Measurement only; a disk that did not attach is counted and reported, not retried.
Prints a table, then `BENCH_RESULT {json}` last.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchstats import summary  # noqa: E402
from harness import xenstore  # noqa: E402
from harness.stack import Stack, StackConfig  # noqa: E402

DOMAINS = int(os.environ.get("BENCH_STORM_DOMAINS", "20"))
DISKS = int(os.environ.get("BENCH_STORM_DISKS", "4"))
ROUNDS = int(os.environ.get("BENCH_STORM_ROUNDS", "5"))
FIRST_DEVID = 51712  # xvda
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def storm(stack: Stack, script: str, action: str, backends: list[str], log: Path) -> dict[str, Any]:
    """Spawn `script action` for every backend at once; {backend: (seconds, exit status)}."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
    ]
    base = stack.env({"PATH": DAEMON_PATH})
    envs = [{**base, "XENBUS_PATH": be, "XENBUS_TYPE": "vbd", "XENBUS_BASE_PATH": "backend"}
            for be in backends]  # fmt: skip
    started: dict[int, tuple[str, float]] = {}
    t0 = time.perf_counter()
    for be, env in zip(backends, envs, strict=True):
        pid = os.posix_spawn(script, [script, action], env, file_actions=actions)
        started[pid] = (be, time.perf_counter())
    done: dict[str, Any] = {}
    while started:
        pid, status = os.waitpid(-1, 0)
        if pid not in started:
            continue
        be, t_spawn = started.pop(pid)
        done[be] = (time.perf_counter() - t_spawn, os.waitstatus_to_exitcode(status))
    done["_wall"] = time.perf_counter() - t0
    return done


def main() -> int:
    config = StackConfig(domains={f"s{i:02d}": i for i in range(1, DOMAINS + 1)})
    script = str(config.venv / "bin" / "blockbroker-block")
    adds: list[float] = []
    removes: list[float] = []
    walls: list[float] = []
    remove_walls: list[float] = []
    failed = attached = 0
    with Stack(config) as stack:
        log = stack.stack_dir / "blockscript.log"
        disks = [(fe, FIRST_DEVID + 16 * d) for fe in range(1, DOMAINS + 1) for d in range(DISKS)]
        images = {disk: stack.make_image(f"storm-{disk[0]}-{disk[1]}.img") for disk in disks}
        for round_ in range(ROUNDS + 1):  # round 0 warms up
            backends = [
                xenstore.write_libxl_vbd(stack.xs, fe, devid, str(images[(fe, devid)]))
                for fe, devid in disks
            ]
            added = storm(stack, script, "add", backends, log)
            ok = [
                be
                for be in backends
                if added[be][1] == 0
                and stack.xs_read(f"{be}/physical-device")
                and stack.xs_read(f"{be}/hotplug-status") == "connected"
            ]
            removed = storm(stack, script, "remove", ok, log)
            for fe, devid in disks:
                for path in (
                    f"/local/domain/0/backend/vbd/{fe}/{devid}",
                    f"/local/domain/{fe}/device/vbd/{devid}",
                ):
                    if stack.xs_exists(path):
                        stack.xs_rm(path)
            if round_ == 0:
                continue
            attached += len(ok)
            failed += len(backends) - len(ok)
            adds += [added[be][0] for be in backends]
            removes += [removed[be][0] for be in ok]
            walls.append(added["_wall"])
            remove_walls.append(removed["_wall"])
            print(
                f"round {round_}: {len(ok)}/{len(backends)} attached, add wall "
                f"{added['_wall'] * 1e3:.0f} ms, remove wall {removed['_wall'] * 1e3:.0f} ms",
                flush=True,
            )
    result: dict[str, Any] = {
        "domains": DOMAINS,
        "disks_per_domain": DISKS,
        "rounds": ROUNDS,
        "attached": attached,
        "failed": failed,
        "add_per_disk": summary(adds),
        "remove_per_disk": summary(removes),
        "add_wall": summary(walls),
        "remove_wall": summary(remove_walls),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    print(f"{'':<18} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name in ("add_per_disk", "remove_per_disk", "add_wall", "remove_wall"):
        s = result[name]
        print(f"{name:<18} {s['n']:>5} {s['p50_ms']:>9} {s['p99_ms']:>9} {s['max_ms']:>9}")
    print(f"attached {attached}, failed {failed}; load average {result['load_average']}")
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
