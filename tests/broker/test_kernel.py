"""broker/kernel.py against the real kernel headers: a C program prints every number and size."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import kernel

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/major.h>
#include <linux/openat2.h>
#define P(name) printf("%s %llu\n", #name, (unsigned long long)(name))
int main(void) {
    P(LOOP_CONFIGURE); P(LOOP_GET_STATUS64); P(LOOP_CTL_GET_FREE);
    P(LO_FLAGS_READ_ONLY); P(LO_FLAGS_AUTOCLEAR); P(LO_FLAGS_DIRECT_IO);
    P(LO_NAME_SIZE); P(LO_KEY_SIZE); P(LOOP_MAJOR);
    P(BLKROGET); P(BLKGETSIZE64); P(BLKGETDISKSEQ);
    P(RESOLVE_NO_MAGICLINKS); P(RESOLVE_NO_SYMLINKS); P(RESOLVE_BENEATH);
    P(SYS_openat2);
    P(sizeof(struct loop_info64)); P(sizeof(struct loop_config)); P(sizeof(struct open_how));
    P(offsetof(struct loop_info64, lo_flags)); P(offsetof(struct loop_info64, lo_file_name));
    P(offsetof(struct loop_info64, lo_init)); P(offsetof(struct loop_config, info));
    P(offsetof(struct open_how, resolve));
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed (make install adds it)"
    d: Path = tmp_path_factory.mktemp("kernel-abi")
    (d / "abi.c").write_text(C_PROGRAM)
    subprocess.run([gcc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.rsplit(" ", 1) for line in out.splitlines())}


CONSTANTS = [
    "LOOP_CONFIGURE", "LOOP_GET_STATUS64", "LOOP_CTL_GET_FREE", "LO_FLAGS_READ_ONLY",
    "LO_FLAGS_AUTOCLEAR", "LO_FLAGS_DIRECT_IO", "LO_NAME_SIZE", "LO_KEY_SIZE", "LOOP_MAJOR",
    "BLKROGET", "BLKGETSIZE64", "BLKGETDISKSEQ", "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS", "RESOLVE_BENEATH", "SYS_openat2",
]  # fmt: skip


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(header_values: dict[str, int], name: str) -> None:
    assert getattr(kernel, name) == header_values[name]


def test_struct_layouts_match_header(header_values: dict[str, int]) -> None:
    v = header_values
    assert ctypes.sizeof(kernel.loop_info64) == v["sizeof(struct loop_info64)"] == 232
    assert ctypes.sizeof(kernel.loop_config) == v["sizeof(struct loop_config)"] == 304
    assert ctypes.sizeof(kernel.open_how) == v["sizeof(struct open_how)"] == 24
    assert kernel.loop_info64.lo_flags.offset == v["offsetof(struct loop_info64, lo_flags)"]
    assert kernel.loop_info64.lo_file_name.offset == v["offsetof(struct loop_info64, lo_file_name)"]
    assert kernel.loop_info64.lo_init.offset == v["offsetof(struct loop_info64, lo_init)"]
    assert kernel.loop_config.info.offset == v["offsetof(struct loop_config, info)"]
    assert kernel.open_how.resolve.offset == v["offsetof(struct open_how, resolve)"]


def test_every_ioctl_used_is_listed() -> None:
    source = Path(kernel.__file__).with_name("ops.py").read_text()
    used = {name for name in dir(kernel) if name.isupper() and f"kernel.{name}" in source}
    ioctls = {n for n in used if n.startswith(("LOOP_", "BLK")) and n != "LOOP_MAJOR"}
    assert {getattr(kernel, n) for n in ioctls} == set(kernel.IOCTLS_USED)
