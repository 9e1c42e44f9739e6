"""A loop device's node comes from sysfs, not from its minor (no daemons, no root).

With the loop driver's max_part=N, loop device k has minor k*(N+1) and its partitions the N
minors after it, so /dev/loop{minor} is wrong as soon as N > 0 (this host's loop module has
max_part=0). The test builds the sysfs tree the kernel would show for N = 0, 7 and 15.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyd.brokerclient import Identity
from policyd.exports.registry import Backing, file_key
from policyd.exports.sources import device_path

LOOP_MAJOR = 7
LOOPS = 4


def fake_sysfs(root: Path, max_part: int) -> Path:
    """sysfs's dev/block/7:MINOR links for LOOPS loop devices and (max_part > 0) their first
    partition, pointing where the kernel points them."""
    links = root / "dev" / "block"
    links.mkdir(parents=True)
    for k in range(LOOPS):
        disk = f"../../devices/virtual/block/loop{k}"
        os.symlink(disk, links / f"{LOOP_MAJOR}:{k * (max_part + 1)}")
        if max_part:
            os.symlink(f"{disk}/loop{k}p1", links / f"{LOOP_MAJOR}:{k * (max_part + 1) + 1}")
    return root


def loop_identity(minor: int) -> Identity:
    return Identity(
        LOOP_MAJOR, minor, diskseq=minor + 1, size=1 << 20, backing_dev=1, backing_ino=2
    )


@pytest.mark.parametrize("max_part", [0, 7, 15])
def test_loop_devices_are_named_by_sysfs(tmp_path: Path, max_part: int) -> None:
    sysfs = str(fake_sysfs(tmp_path, max_part))
    for k in range(LOOPS):
        minor = k * (max_part + 1)
        assert device_path(loop_identity(minor), sysfs) == f"/dev/loop{k}"
        if max_part:
            assert device_path(loop_identity(minor + 1), sysfs) == f"/dev/loop{k}p1"


@pytest.mark.parametrize("max_part", [0, 7, 15])
def test_backing_loop_device_is_the_sysfs_name(tmp_path: Path, max_part: int) -> None:
    sysfs = str(fake_sysfs(tmp_path, max_part))
    ident = loop_identity(3 * (max_part + 1))
    backing = Backing(file_key(1, 2), 100, ident, "file", False, (), device_path(ident, sysfs))
    assert backing.loop_device == "/dev/loop3"


def test_unknown_device_falls_back_to_dev_block(tmp_path: Path) -> None:
    sysfs = str(fake_sysfs(tmp_path, 0))
    assert device_path(loop_identity(LOOPS), sysfs) == f"/dev/block/{LOOP_MAJOR}:{LOOPS}"
