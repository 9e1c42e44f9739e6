"""Benchmark of the broker's LOOP_FILE path (runs as root; measurement only, never pass/fail).

Raw floor: LOOP_CTL_GET_FREE + open + LOOP_CONFIGURE(AUTOCLEAR|READ_ONLY) + close, in this
process, with the backing file opened once. Broker round trip: BrokerClient.loop_file + close of
the returned fd, from this process to a real broker subprocess (sandboxed, as in production).
Target: the round trip's median within 3x of the raw floor's. Last line: BENCH_RESULT <json>.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.brokerclient import BrokerClient  # noqa: E402

from broker import kernel  # noqa: E402

ROUNDS = 400
WARMUP = 20


def raw_attach_close(control: int, backing_fd: int) -> None:
    config = kernel.loop_config(fd=backing_fd)
    config.info.lo_flags = kernel.LO_FLAGS_AUTOCLEAR | kernel.LO_FLAGS_READ_ONLY
    for _ in range(8):
        number = fcntl.ioctl(control, kernel.LOOP_CTL_GET_FREE)
        fd = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, kernel.LOOP_CONFIGURE, bytes(config))
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENXIO):
                raise
        finally:
            os.close(fd)
    raise RuntimeError("no free loop device")


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def summary(name: str, times: list[float]) -> dict[str, float]:
    times = sorted(times)
    result = {
        "median_us": statistics.median(times) * 1e6,
        "p99_us": times[int(len(times) * 0.99) - 1] * 1e6,
    }
    print(f"{name}: median {result['median_us']:.0f} us, p99 {result['p99_us']:.0f} us")
    return result


def measure(raw: Callable[[], None], via: Callable[[], None]) -> tuple[list[float], list[float]]:
    """Alternates the two, so that both see the same background load (other loop users)."""
    for _ in range(WARMUP):
        raw()
        via()
    pairs = [(timed(raw), timed(via)) for _ in range(ROUNDS)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def main() -> int:
    broker_bin = Path(sys.executable).with_name("blockbroker-broker")
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        image = root / "disk.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        config = Path(tmp) / "broker.toml"
        config.write_text(f'client_user = "root"\nfile_roots = ["{root}"]\nblock_majors = [7]\n')
        config.chmod(0o644)
        sock = Path(tmp) / "broker.sock"
        broker = subprocess.Popen(
            [str(broker_bin), "--config", str(config), "--socket", str(sock)],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            backing = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            client = BrokerClient(str(sock))

            def round_trip() -> None:
                fd, _ = client.loop_file(str(image), writable=False)
                os.close(fd)

            raw_times, via_times = measure(lambda: raw_attach_close(control, backing), round_trip)
            client.close()
            os.close(backing)
            os.close(control)
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    raw = summary("raw floor (GET_FREE+open+LOOP_CONFIGURE+close, in-process)", raw_times)
    via = summary("broker round trip (LOOP_FILE + close, from another process)", via_times)
    ratio = via["median_us"] / raw["median_us"]
    print(f"ratio broker/raw (median): {ratio:.2f}x (target: within 3x)")
    result = {
        "raw_median_us": round(raw["median_us"], 1),
        "raw_p99_us": round(raw["p99_us"], 1),
        "broker_median_us": round(via["median_us"], 1),
        "broker_p99_us": round(via["p99_us"], 1),
        "ratio_median": round(ratio, 2),
        "rounds": ROUNDS,
    }
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
