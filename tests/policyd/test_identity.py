"""Which device a block path names (policyd.exports.identity), against a fake sysfs tree.

The tree is a stand-in for sysfs, built here as the kernel lays it out (dev/block/MAJ:MIN and
class/block/NAME links into devices/, `dev`, `partition`, `diskseq`, `dm/name`, `dm/uuid`):
this host's kernel has no device-mapper, so dm devices exist only in this stand-in here; the
Xen lab's dm scenario (xenlab/scenarios/dmlvm.sh) runs the same code against real LVM. No
daemons, no root; the real-device tests are in test_identity_real.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyd import errors
from policyd.exports import identity
from policyd.exports.identity import lvm_dm_name, named_by, verify

DM_MAJOR = 254
UUID_A = "LVM-" + "a" * 32 + "b" * 32
UUID_B = "LVM-" + "a" * 32 + "c" * 32


class FakeSysfs:
    """A stand-in for sysfs: block devices as the kernel shows them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "dev/block").mkdir(parents=True)
        (root / "class/block").mkdir(parents=True)

    def _link(self, rel: str, name: str, dev: str) -> None:
        os.symlink(f"../../{rel}", self.root / "dev/block" / dev)
        os.symlink(f"../../{rel}", self.root / "class/block" / name)

    def disk(
        self, name: str, dev: str, diskseq: int, parent: str = "devices/virtual/block"
    ) -> Path:
        d = self.root / parent / name
        d.mkdir(parents=True)
        (d / "dev").write_text(dev + "\n")
        (d / "diskseq").write_text(f"{diskseq}\n")
        self._link(f"{parent}/{name}", name, dev)
        return d

    def partition(self, disk: Path, name: str, dev: str, number: int) -> Path:
        p = disk / name
        p.mkdir()
        (p / "dev").write_text(dev + "\n")
        (p / "partition").write_text(f"{number}\n")
        self._link(str(p.relative_to(self.root)), name, dev)
        return p

    def dm(self, minor: int, name: str, uuid: str, diskseq: int) -> Path:
        d = self.disk(f"dm-{minor}", f"{DM_MAJOR}:{minor}", diskseq)
        (d / "dm").mkdir()
        (d / "dm/name").write_text(name + "\n")
        (d / "dm/uuid").write_text(uuid + "\n")
        return d


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


def changed(*args: object, **kwargs: object) -> str:
    with pytest.raises(errors.DeviceChanged) as info:
        verify(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_lvm_name_mangling() -> None:
    assert lvm_dm_name("qubes_dom0", "vm-work-private") == "qubes_dom0-vm--work--private"
    assert lvm_dm_name("vg-a", "lv-b") == "vg--a-lv--b"
    assert lvm_dm_name("vg", "lv") == "vg-lv"


def test_what_paths_claim() -> None:
    assert named_by("/dev/mapper/vg-lv") == ("dm-name", "vg-lv")
    assert named_by("/dev/vg-a/lv") == ("lvm", "vg--a-lv")
    assert named_by("/dev/disk/by-id/dm-name-vg-lv") == ("dm-name", "vg-lv")
    assert named_by("/dev/disk/by-id/dm-uuid-" + UUID_A) == ("dm-uuid", UUID_A)
    assert named_by("/dev/sdb1") == ("kernel", "sdb1")
    assert named_by("/dev/block/254:0") == ("", "")  # udev's link, not a VG
    assert named_by("/dev/md/raid") == ("", "")
    assert named_by("/dev/disk/by-path/pci-0000:00:1f.2-ata-1") == ("", "")
    assert named_by("/srv/images/a.img") == ("", "")


def test_dm_by_mapper_name_lvm_path_and_uuid(sysfs: FakeSysfs) -> None:
    sysfs.dm(3, "qubes_dom0-vm--work--private", UUID_A, diskseq=40)
    root = str(sysfs.root)
    for path in ("/dev/mapper/qubes_dom0-vm--work--private", "/dev/qubes_dom0/vm-work-private"):
        names = verify(path, DM_MAJOR, 3, 40, UUID_A, sysfs_root=root)
        assert (names.dm_name, names.dm_uuid) == ("qubes_dom0-vm--work--private", UUID_A)
        assert (names.kernel_name, names.disk, names.partition) == ("dm-3", "dm-3", 0)
    assert verify("/dev/dm-3", DM_MAJOR, 3, 40, sysfs_root=root).dm_uuid == UUID_A
    assert verify("/dev/disk/by-id/dm-uuid-" + UUID_A, DM_MAJOR, 3, 40, sysfs_root=root)


def test_dm_renamed_is_refused(sysfs: FakeSysfs) -> None:
    """/dev/vg/lv opened, then the volume renamed to lv2 (sysfs shows the new name)."""
    sysfs.dm(3, "vg-lv2", UUID_A, diskseq=40)
    root = str(sysfs.root)
    message = changed("/dev/vg/lv", DM_MAJOR, 3, 40, sysfs_root=root)
    assert "'vg-lv'" in message and "'vg-lv2'" in message
    assert "renamed" in changed("/dev/mapper/vg-lv", DM_MAJOR, 3, 40, sysfs_root=root)


def test_dm_recreated_under_the_name_is_refused_by_uuid(sysfs: FakeSysfs) -> None:
    """Removed and recreated as vg/lv: same name (often the same minor), another LV uuid."""
    sysfs.dm(3, "vg-lv", UUID_B, diskseq=41)
    message = changed("/dev/vg/lv", DM_MAJOR, 3, 41, UUID_A, sysfs_root=str(sysfs.root))
    assert UUID_A in message and UUID_B in message
    assert changed(f"/dev/disk/by-id/dm-uuid-{UUID_A}", DM_MAJOR, 3, 41, sysfs_root=str(sysfs.root))


def test_dm_disk_replaced_after_the_broker_read_diskseq(sysfs: FakeSysfs) -> None:
    sysfs.dm(3, "vg-lv", UUID_A, diskseq=41)
    assert "diskseq 41" in changed("/dev/vg/lv", DM_MAJOR, 3, 40, sysfs_root=str(sysfs.root))


def test_lvm_path_to_a_device_that_is_not_dm(sysfs: FakeSysfs) -> None:
    """/dev/A/B is LVM's form only for a dm device: /dev/md/x is not checked by name."""
    sysfs.disk("md127", "9:127", diskseq=7)
    names = verify("/dev/md/raid", 9, 127, 7, sysfs_root=str(sysfs.root))
    assert names.dm_name == "" and names.kernel_name == "md127"
    # but /dev/mapper/NAME and a dm uuid are claims about a dm device: refused for another
    assert "no dm device" in changed("/dev/mapper/raid", 9, 127, 7, sysfs_root=str(sysfs.root))
    assert changed("/dev/md/raid", 9, 127, 7, UUID_A, sysfs_root=str(sysfs.root))


def test_partition_and_whole_disk(sysfs: FakeSysfs) -> None:
    root = str(sysfs.root)
    sdz = sysfs.disk("sdz", "8:240", diskseq=12, parent="devices/pci0000:00/host0/block")
    sysfs.partition(sdz, "sdz1", "8:241", 1)
    sysfs.partition(sdz, "sdz2", "8:242", 2)
    nvme = sysfs.disk("nvme9n1", "259:0", diskseq=13)
    sysfs.partition(nvme, "nvme9n1p2", "259:3", 2)
    names = verify("/dev/sdz1", 8, 241, 12, sysfs_root=root)
    assert (names.kernel_name, names.disk, names.partition, names.disk_diskseq) == (
        "sdz1",
        "sdz",
        1,
        12,
    )
    assert verify("/dev/sdz", 8, 240, 12, sysfs_root=root).partition == 0
    assert verify("/dev/nvme9n1p2", 259, 3, 13, sysfs_root=root).disk == "nvme9n1"
    # the path names sdz1 but the device opened is sdz2 (a node or link that lies)
    assert "names sdz1, which is 8:241" in changed("/dev/sdz1", 8, 242, 12, sysfs_root=root)
    # the disk was replaced (a new diskseq) after the broker read it
    assert "diskseq 12" in changed("/dev/sdz1", 8, 241, 11, sysfs_root=root)
    # a name sysfs does not know makes no claim (a node of the admin's own naming)
    assert verify("/dev/my-disk", 8, 241, 12, sysfs_root=root).kernel_name == "sdz1"


def test_partition_whose_name_is_not_its_disks(sysfs: FakeSysfs) -> None:
    sdz = sysfs.disk("sdz", "8:240", diskseq=12)
    sysfs.partition(sdz, "sdy1", "8:241", 1)
    assert "does not name it" in changed("/dev/sdy1", 8, 241, 12, sysfs_root=str(sysfs.root))


def test_unknown_device_and_lying_dev_file(sysfs: FakeSysfs) -> None:
    root = str(sysfs.root)
    assert "no block device 8:1" in changed("/dev/sda1", 8, 1, 0, sysfs_root=root)
    d = sysfs.disk("sdz", "8:240", diskseq=12)
    (d / "dev").write_text("8:16\n")
    assert "not 8:240" in changed("/dev/sdz", 8, 240, 12, sysfs_root=root)


def test_no_diskseq_in_sysfs(sysfs: FakeSysfs) -> None:
    """Kernels before 5.15 have no sysfs diskseq: that check is skipped, the rest hold."""
    d = sysfs.dm(0, "vg-lv", UUID_A, diskseq=1)
    (d / "diskseq").unlink()
    names = verify("/dev/vg/lv", DM_MAJOR, 0, 99, UUID_A, sysfs_root=str(sysfs.root))
    assert names.disk_diskseq is None
    assert identity.names_or_empty(DM_MAJOR, 9, str(sysfs.root)) == identity.DeviceNames()
