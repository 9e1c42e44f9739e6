"""Block device identity (policyd.exports.identity) against this host's real sysfs and devices.

Runs as root: a loop device over a test image with a partition table (`losetup -P`; this host's
kernel has no device-mapper, so dm names are tested against a stand-in in test_identity.py and
for real in the Xen lab). The stack tests export through policyd: a symlink to a block device is
followed and checked, a dm-uuid that does not match is DeviceChanged, and nothing leaks.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Variant
from harness.stack import Stack
from policydlab import Api, assert_clean, held_block_fds

from policyd import errors
from policyd.exports.identity import verify

pytestmark = [pytest.mark.root]

BLKGETDISKSEQ = 0x80081280  # _IOR(0x12, 128, __u64)
UUID = "LVM-" + "a" * 64


def diskseq_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, BLKGETDISKSEQ, b"\0" * 8)
    finally:
        os.close(fd)
    return int(struct.unpack("Q", buf)[0])


def dev_of(path: str) -> tuple[int, int]:
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)


def wait_for(path: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def mbr(partitions: list[tuple[int, int]]) -> bytes:
    """A DOS partition table (the first sector): (start, sectors) entries of type 0x83."""
    table = bytearray(512)
    for i, (start, sectors) in enumerate(partitions):
        entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", start, sectors)
        table[446 + 16 * i : 462 + 16 * i] = entry
    table[510:512] = b"\x55\xaa"
    return bytes(table)


def partitioned_loop(image: Path) -> Iterator[str]:
    """A loop device (ours, not AUTOCLEAR) over `image` with two partitions; detached after."""
    with open(image, "wb") as f:
        f.truncate(8 << 20)
        f.write(mbr([(2048, 4096), (6144, 4096)]))
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-P", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        # this host's kernel parses no partition table (no CONFIG_MSDOS_PARTITION): partx adds
        # the partitions with BLKPG, as the kernel's own scan would (the same sysfs entries)
        if not os.path.exists(loop + "p2"):
            subprocess.run(["partx", "-a", loop], check=True, capture_output=True)
        wait_for(loop + "p2")
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    yield from partitioned_loop(tmp_path / "parts.img")


def test_whole_disk_and_partitions_of_a_real_loop(loop: str) -> None:
    seq = diskseq_of(loop)
    assert diskseq_of(loop + "p1") == seq  # a partition's BLKGETDISKSEQ is its disk's
    disk = verify(loop, *dev_of(loop), seq)
    kname = os.path.basename(loop)
    assert (disk.kernel_name, disk.disk, disk.partition, disk.disk_diskseq) == (
        kname,
        kname,
        0,
        seq,
    )
    part = verify(loop + "p2", *dev_of(loop + "p2"), seq)
    assert (part.kernel_name, part.disk, part.partition) == (kname + "p2", kname, 2)
    assert part.dm_name == "" and part.dm_uuid == ""


def test_real_mismatches_are_refused(loop: str, tmp_path: Path) -> None:
    seq = diskseq_of(loop)
    with pytest.raises(errors.DeviceChanged, match="names"):
        verify(loop + "p1", *dev_of(loop + "p2"), seq)  # the path names p1, p2 was opened
    with pytest.raises(errors.DeviceChanged, match="diskseq"):
        verify(loop + "p1", *dev_of(loop + "p1"), seq + 1)  # the disk was replaced
    with pytest.raises(errors.DeviceChanged, match="uuid"):
        verify(loop, *dev_of(loop), seq, UUID)  # a dm uuid expected of a loop device
    # a symlink's target is checked too: a link to p1 does not name p2
    link = tmp_path / "by-label-data"
    link.symlink_to(loop + "p1")
    assert verify(str(link), *dev_of(loop + "p1"), seq).kernel_name.endswith("p1")
    with pytest.raises(errors.DeviceChanged, match="names"):
        verify(str(link), *dev_of(loop + "p2"), seq)


@pytest.mark.daemon
def test_export_through_a_symlink_and_a_wrong_dm_uuid(stack: Stack, api: Api) -> None:
    """A symlink to a block device (as /dev/VG/LV and udev's links are) is followed, the
    device checked and exported; the dm-uuid option on a device without it is DeviceChanged,
    with nothing held or written."""
    image = stack.image_dir / "identity-parts.img"
    for loop in partitioned_loop(image):
        link = stack.stack_dir / "vg-link"
        link.symlink_to(loop)
        assert api.export_err(loop, **{"dm-uuid": _s(UUID)}) == "DeviceChanged"
        assert api.export_err(link, **{"dm-uuid": _s(UUID)}) == "DeviceChanged"
        assert held_block_fds(stack) == []
        export = api.export(link)
        props = api.props(export)
        assert props["SourceKind"] == "block" and props["Source"] == str(link)
        assert (props["Major"], props["Minor"]) == dev_of(loop)
        assert props["Diskseq"] == diskseq_of(loop)
        assert props["DmName"] == "" and props["DmUuid"] == ""
        api.detach(export)
        assert api.export_err(image, **{"dm-uuid": _s(UUID)}) == "InvalidArgument"
        assert api.export_err(link, **{"dm-uuid": _s("has space")}) == "InvalidArgument"
    assert_clean(stack, image)


@pytest.mark.daemon
def test_export_of_a_dev_link_is_judged_as_its_kernel_name(stack: Stack, api: Api) -> None:
    """/dev/VG/LV-shaped link to a loop device: the policy judges the kernel name the link
    leads to (the audit line says device=loopN), the device is exported under the link's name;
    a policy that denies that kernel name denies the link too, with nothing held."""
    image = stack.image_dir / "identity-devlink.img"
    vg = Path(f"/dev/bbtest-{os.getpid()}")
    for loop in partitioned_loop(image):
        vg.mkdir()
        try:
            link = vg / "vol"
            link.symlink_to(f"../{os.path.basename(loop)}")
            export = api.export(link)
            props = api.props(export)
            assert props["Source"] == str(link)
            assert (props["Major"], props["Minor"]) == dev_of(loop)
            api.detach(export)
            kname = os.path.basename(loop)
            log = stack.log_path("policyd").read_text()
            assert f"device={kname} " in log
            deny = stack.policy_dir / "00-deny-this-loop.policy"
            deny.write_text(f"export {kname} dom0 @anyvm deny\n")
            try:
                deadline = time.monotonic() + 10
                while (err := api.export_err(link)) != "PolicyDenied":
                    assert time.monotonic() < deadline, f"still {err} after the policy change"
                    time.sleep(0.2)
            finally:
                deny.unlink()
            assert held_block_fds(stack) == []
        finally:
            for entry in vg.iterdir():
                entry.unlink()
            vg.rmdir()
    assert_clean(stack, image)


def _s(value: str) -> Variant:
    return Variant("s", value)
