"""Every kept fuzz input, replayed as a plain test: the seeds (tests/fuzz/corpus/<target>/) and
the inputs that once crashed a target or broke a property (tests/fuzz/regressions/<target>/,
written there by `make fuzz`). A regression input fails here until its bug is fixed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fuzzrun import C_TARGET, CFLAGS, CLANG, HERE, SANITIZER_ENV
from fuzztargets import TARGETS

KEPT = ("corpus", "regressions")


def kept_inputs(targets: list[str]) -> list[Path]:
    return sorted(
        path
        for kind in KEPT
        for target in targets
        if (HERE / kind / target).is_dir()
        for path in (HERE / kind / target).iterdir()
        if path.is_file() and not path.name.startswith(".")
    )


@pytest.mark.parametrize(
    "path",
    kept_inputs(list(TARGETS)),
    ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}",
)
def test_python_target_input(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


def test_blockscript_inputs(tmp_path: Path) -> None:
    """The C harness (ASan, UBSan, its own property checks) over every kept input; libFuzzer
    runs the files given and exits non-zero on the first failure."""
    inputs = kept_inputs([C_TARGET])
    assert inputs, "the blockscript seeds are missing"
    binary = tmp_path / "blockscript_fuzz"
    subprocess.run(
        [CLANG, *CFLAGS, "-o", str(binary), str(HERE / "blockscript_fuzz.c")], check=True
    )
    proc = subprocess.run(
        [str(binary), *map(str, inputs)],
        env=SANITIZER_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
