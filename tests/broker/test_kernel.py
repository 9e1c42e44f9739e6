"""broker/kernel.py against the real kernel headers: a C program prints every number and size;
Landlock access rights newer than the installed header (Debian 12's is 6.1's: ABI 2) are checked
against the running kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import kernel, sandbox

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/major.h>
#include <linux/openat2.h>
#include <linux/landlock.h>
#define P(name) printf("%s %llu\n", #name, (unsigned long long)(name))
int main(void) {
    P(LOOP_CONFIGURE); P(LOOP_GET_STATUS64); P(LOOP_CTL_GET_FREE);
    P(LO_FLAGS_READ_ONLY); P(LO_FLAGS_AUTOCLEAR); P(LO_FLAGS_DIRECT_IO);
    P(LO_NAME_SIZE); P(LO_KEY_SIZE); P(LOOP_MAJOR);
    P(BLKROGET); P(BLKGETSIZE64); P(BLKGETDISKSEQ);
    P(RESOLVE_NO_MAGICLINKS); P(RESOLVE_NO_SYMLINKS); P(RESOLVE_BENEATH);
    P(SYS_openat2);
    P(SYS_landlock_create_ruleset); P(SYS_landlock_add_rule); P(SYS_landlock_restrict_self);
    P(LANDLOCK_CREATE_RULESET_VERSION); P(LANDLOCK_RULE_PATH_BENEATH);
    P(LANDLOCK_ACCESS_FS_WRITE_FILE); P(LANDLOCK_ACCESS_FS_READ_FILE);
    P(LANDLOCK_ACCESS_FS_MAKE_SYM); P(LANDLOCK_ACCESS_FS_REFER);
#ifdef LANDLOCK_ACCESS_FS_TRUNCATE
    P(LANDLOCK_ACCESS_FS_TRUNCATE);
#endif
#ifdef LANDLOCK_ACCESS_FS_IOCTL_DEV
    P(LANDLOCK_ACCESS_FS_IOCTL_DEV);
#endif
    P(sizeof(struct landlock_ruleset_attr)); P(sizeof(struct landlock_path_beneath_attr));
    P(offsetof(struct landlock_path_beneath_attr, parent_fd));
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
    "RESOLVE_NO_SYMLINKS", "RESOLVE_BENEATH", "SYS_openat2", "SYS_landlock_create_ruleset",
    "SYS_landlock_add_rule", "SYS_landlock_restrict_self", "LANDLOCK_CREATE_RULESET_VERSION",
    "LANDLOCK_RULE_PATH_BENEATH", "LANDLOCK_ACCESS_FS_WRITE_FILE", "LANDLOCK_ACCESS_FS_READ_FILE",
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
    assert ctypes.sizeof(kernel.landlock_ruleset_attr) >= 8  # the header's grows with the ABI
    assert v["sizeof(struct landlock_ruleset_attr)"] >= 8
    assert ctypes.sizeof(kernel.landlock_path_beneath_attr) == 12
    assert v["sizeof(struct landlock_path_beneath_attr)"] == 12
    parent_fd = "offsetof(struct landlock_path_beneath_attr, parent_fd)"
    assert kernel.landlock_path_beneath_attr.parent_fd.offset == v[parent_fd] == 8


def test_landlock_rights_per_abi_match_header(header_values: dict[str, int]) -> None:
    """LANDLOCK_FS_RIGHTS[n]: the highest right of ABI n is bit LANDLOCK_FS_RIGHTS[n] - 1."""
    rights = kernel.LANDLOCK_FS_RIGHTS
    newest = {1: "MAKE_SYM", 2: "REFER", 3: "TRUNCATE", 5: "IOCTL_DEV"}
    for abi, right in newest.items():
        value = header_values.get(f"LANDLOCK_ACCESS_FS_{right}")
        assert value in (None, 1 << (rights[abi] - 1)), right  # None: newer than the header
    assert 1 << (rights[5] - 1) == kernel.LANDLOCK_ACCESS_FS_IOCTL_DEV
    assert list(rights) == sorted(rights)


def test_landlock_rights_match_the_running_kernel() -> None:
    """The kernel accepts a ruleset handling every right kernel.py says its ABI knows, and
    refuses one more bit (EINVAL): the count is neither short nor long for this kernel."""
    abi = sandbox.landlock_abi()
    if not abi:
        pytest.skip("this kernel has no Landlock")
    known = kernel.LANDLOCK_FS_RIGHTS[min(abi, len(kernel.LANDLOCK_FS_RIGHTS) - 1)]
    for bits, ok in ((known, True), (known + 1, False)):
        attr = kernel.landlock_ruleset_attr((1 << bits) - 1)
        size, create = ctypes.sizeof(attr), kernel.SYS_landlock_create_ruleset
        try:
            os.close(kernel.syscall(create, ctypes.byref(attr), size, 0))
            assert ok, f"{bits} rights accepted by ABI {abi}"
        except OSError as e:
            assert not ok and e.errno == errno.EINVAL, (bits, e)


def test_every_ioctl_used_is_listed() -> None:
    source = Path(kernel.__file__).with_name("ops.py").read_text()
    used = {name for name in dir(kernel) if name.isupper() and f"kernel.{name}" in source}
    ioctls = {n for n in used if n.startswith(("LOOP_", "BLK")) and n != "LOOP_MAJOR"}
    assert {getattr(kernel, n) for n in ioctls} == set(kernel.IOCTLS_USED)
