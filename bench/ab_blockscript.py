"""A/B of two installs on the per-disk path: blockbroker-block add + remove, alternated.

Runs as root. Starts one host stack per venv (tests/harness: oxenstored, dbus-daemon with the
project's policy, broker, policyd as user blockbroker), side by side, and alternates their
iterations so a change in machine load hits both alike. Each iteration is bench_blockscript's
"blockbroker-block" candidate: libxl's backend write (one transaction, `script` naming the
install's blockbroker-block, so policyd pre-attaches), `add` timed from that commit to the
script's exit, libxl's online = 0 write, `remove` timed the same way. Prints p50 per install.
An install whose policyd has no --block-socket runs without one (its script uses D-Bus).

    bench/ab_blockscript.py /opt/bb-a/venv /opt/bb-b/venv   # AB_N=200 iterations each
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import xenstore  # noqa: E402
from harness.stack import Stack, StackConfig  # noqa: E402

FE = 1
DEVID = 51712
WARMUP = 10


def run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv} exited with status {status}")
    return (time.perf_counter() - start) * 1e3


def has_block_socket(venv: str) -> bool:
    """Whether that install's policyd has --block-socket (older ones: D-Bus only)."""
    usage = subprocess.run(
        [f"{venv}/bin/blockbroker-policyd", "--help"], capture_output=True, text=True, check=False
    )
    return "--block-socket" in usage.stdout


def main(venvs: list[str]) -> int:
    if os.geteuid() != 0 or len(venvs) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    n = int(os.environ.get("AB_N", "200"))
    samples: dict[str, dict[str, list[float]]] = {v: {"add": [], "remove": []} for v in venvs}
    with contextlib.ExitStack() as stacks:
        setups = []
        for venv in venvs:
            config = StackConfig(
                domains={"work": FE}, venv=Path(venv), block_socket=has_block_socket(venv)
            )
            stack = stacks.enter_context(Stack(config))
            env = stack.env({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            env.update(XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
            setups.append((venv, stack, stack.make_image("ab.img", 16 << 20), env))
        for i in range(WARMUP + n):
            for venv, stack, image, env in setups:
                script = f"{venv}/bin/blockbroker-block"
                be = xenstore.write_libxl_vbd(
                    stack.xs, FE, DEVID, str(image), extra={"script": script}
                )
                env["XENBUS_PATH"] = be
                t_add = run([script, "add"], env)
                if stack.xs_read(f"{be}/hotplug-status") != "connected":
                    raise RuntimeError(f"{script} add left no hotplug-status at {be}")
                xenstore.begin_libxl_remove(stack.xs, be)
                t_remove = run([script, "remove"], env)
                for path in (be, f"/local/domain/{FE}/device/vbd/{DEVID}"):
                    if stack.xs_exists(path):
                        stack.xs_rm(path)
                if i >= WARMUP:
                    samples[venv]["add"].append(t_add)
                    samples[venv]["remove"].append(t_remove)
    for venv, s in samples.items():
        per_disk = [a + r for a, r in zip(s["add"], s["remove"], strict=True)]
        print(
            f"{venv}: add {statistics.median(s['add']):.2f} remove "
            f"{statistics.median(s['remove']):.2f} per disk {statistics.median(per_disk):.2f} "
            f"ms p50 (n={n}, load {os.getloadavg()[0]:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
