"""`make fuzz`: coverage-guided fuzzing of every parser of untrusted input, one target at a time.

Test tooling, no privileges needed; it writes only below --workdir and, for a crash, the crashing
input into tests/fuzz/regressions/<target>/ (where test_fuzz_regressions.py replays it as a
failing test until the bug is fixed). Python targets (tests/fuzz/fuzztargets.py) run under
atheris, each in its own process with its modules instrumented; the C target is
blockbroker-block's reply parsers, D-Bus and block socket (tests/fuzz/blockscript_fuzz.c),
built with clang's libFuzzer, ASan and UBSan. Each target starts from its seeds in
tests/fuzz/corpus/<target>/ and from what earlier runs found in --workdir. See docs/fuzzing.md.

    tests/fuzz/fuzzrun.py [--runs N] [--max-seconds S] [--targets a,b] [--workdir DIR]

The last line printed is `FUZZ {json}`: targets, runs (per target), crashes, seconds, ...;
the exit status is 1 if any target crashed or broke a property.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLANG = os.environ.get("FUZZ_CLANG", "clang-14")
C_TARGET = "blockscript"
# per target: what atheris instruments for coverage, and the largest input tried
PY_TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "frame": (("broker.protocol", "policyd.brokerclient"), 4200),
    "policy": (
        (
            "policyd.policy.parser",
            "policyd.policy.tokens",
            "policyd.policy.tags",
            "policyd.policy.engine",
        ),
        2048,
    ),
    "bridge": (("client.bridge", "policyd.requests.vmdevice", "policyd.validate"), 700),
    "dbus_args": (("policyd.validate", "policyd.requests.vmdevice"), 1024),
    "xs_values": (("policyd.validate", "policyd.xenstore.store", "policyd.xenstore.client"), 512),
    "xs_wire": (("policyd.xenstore.connection",), 9000),
    "block_socket": (("policyd.bus.blocksocket",), 1200),
}
C_MAX_LEN = 80000  # above the script's 64 KiB rx: long messages are discarded, not held
ALL_TARGETS = [*PY_TARGETS, C_TARGET]
CFLAGS = [
    "-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=fuzzer,address,undefined",
    "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-DREPLY_TIMEOUT_MS=1500",
]  # fmt: skip
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
DONE_RE = re.compile(rb"Done (\d+) runs in (\d+) second")
EXECUTED_RE = re.compile(rb"stat::number_of_executed_units: (\d+)")
PROGRESS_RE = re.compile(rb"^#(\d+)\s", re.MULTILINE)  # libFuzzer's progress lines
INTERRUPTED = (72, 130, -2)  # libFuzzer's -interrupted_exitcode, SIGINT: stopped, not a failure
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def worker(target: str, libfuzzer_args: list[str]) -> None:
    """Runs in the child: instrument the target's modules, then hand over to libFuzzer."""
    import atheris

    atheris.enabled_hooks.add("RegEx")  # regex and str comparisons guide the mutator
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports():
        for module in PY_TARGETS[target][0]:
            __import__(module)
    sys.path.insert(0, str(HERE))
    import fuzztargets

    atheris.Setup([sys.argv[0], *libfuzzer_args], fuzztargets.TARGETS[target])
    atheris.Fuzz()  # exits the process


def build_c(workdir: Path) -> Path:
    binary = workdir / "blockscript_fuzz"
    source = HERE / "blockscript_fuzz.c"
    script = REPO / "src/client/blockbroker-block.c"
    newest = max(source.stat().st_mtime, script.stat().st_mtime)
    if not binary.exists() or binary.stat().st_mtime < newest:
        subprocess.run([CLANG, *CFLAGS, "-o", f"{binary}.tmp", str(source)], check=True)
        os.replace(f"{binary}.tmp", binary)
    return binary


def fuzz_one(target: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    tdir = workdir / target
    corpus, artifacts = tdir / "corpus", tdir / "artifacts"
    for d in (corpus, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    for old in artifacts.iterdir():
        old.unlink()
    seeds = HERE / "corpus" / target
    options = [
        f"-runs={args.runs}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        "-error_exitcode=77",
        f"-max_len={C_MAX_LEN if target == C_TARGET else PY_TARGETS[target][1]}",
    ]
    if args.max_seconds:
        options.append(f"-max_total_time={args.max_seconds}")
    dirs = [str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])
    env = dict(os.environ)
    if target == C_TARGET:
        command = [str(build_c(workdir)), *options, *dirs]
        env.update(SANITIZER_ENV)
    else:
        command = [sys.executable, str(Path(__file__)), "--worker", target, *options, *dirs]
    started = time.monotonic()
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    log = proc.stdout
    (tdir / "last.log").write_bytes(log)
    done = DONE_RE.findall(log)
    executed = EXECUTED_RE.findall(log)
    progress = PROGRESS_RE.findall(log)
    runs = int((done[-1][0] if done else None) or (executed or progress or [b"0"])[-1])
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACT_PREFIXES))
    kept = []
    for artifact in found:
        dest = args.regressions / target / artifact.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact, dest)
        kept.append(str(dest.relative_to(REPO)) if dest.is_relative_to(REPO) else str(dest))
    failed = proc.returncode != 0 and (bool(found) or proc.returncode not in INTERRUPTED)
    if failed:
        sys.stdout.write(log[-6000:].decode("utf-8", "replace"))
    print(
        f"fuzz {target}: {runs} runs in {seconds:.1f} s ({runs / max(seconds, 1e-9):.0f}/s), "
        f"exit {proc.returncode}{' (interrupted)' if proc.returncode in INTERRUPTED else ''}, "
        f"kept {kept or 'nothing'}",
        flush=True,
    )
    return {
        "runs": runs,
        "seconds": round(seconds, 1),
        "crashes": max(len(found), int(failed)),
        "kept": kept,
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", 1_000_000)))
    ap.add_argument("--max-seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 0)))
    ap.add_argument("--targets", default=os.environ.get("FUZZ_TARGETS", ",".join(ALL_TARGETS)))
    ap.add_argument(
        "--workdir", type=Path, default=Path(os.environ.get("FUZZ_WORKDIR", "/tmp/bb-fuzz"))
    )
    ap.add_argument("--regressions", type=Path, default=HERE / "regressions")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {', '.join(ALL_TARGETS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {t: fuzz_one(t, args, args.workdir) for t in targets}
    summary = {
        "targets": targets,
        "runs_requested": args.runs,
        "runs": {t: r["runs"] for t, r in results.items()},
        "crashes": sum(int(r["crashes"]) for r in results.values()),  # type: ignore[call-overload]
        "crashes_by_target": {t: r["crashes"] for t, r in results.items()},
        "seconds": round(time.monotonic() - started, 1),
        "seconds_by_target": {t: r["seconds"] for t, r in results.items()},
        "kept": [k for r in results.values() for k in r["kept"]],  # type: ignore[attr-defined]
    }
    print("FUZZ " + json.dumps(summary, sort_keys=True), flush=True)
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
