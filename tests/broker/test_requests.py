"""Each request against real files and real loop devices, through the real broker process."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from brokerlab import (
    Broker,
    bound_loops,
    make_image,
    settled_fd_count,
    start_broker,
    stop_broker,
    wait_no_loops,
    write_config,
)
from harness.brokerclient import BrokerClient

from broker.protocol import ErrorCode
from policyd.brokerclient import BrokerError, BrokerUnavailable

pytestmark = pytest.mark.root


def sysfs(name: str, attr: str) -> str:
    return Path(f"/sys/block/{name}/{attr}").read_text().strip()


def loop_name(fd: int) -> str:
    st = os.fstat(fd)
    assert stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == 7
    return Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve().name


@pytest.mark.parametrize("writable", [False, True])
def test_loop_file_returns_the_bound_device(broker: Broker, writable: bool) -> None:
    image = make_image(broker.root / "disk.img", fill=b"blockbroker!" * 1000)
    client = broker.client()
    fd, ident = client.loop_file(str(image), writable=writable)
    try:
        st = os.fstat(fd)
        name = loop_name(fd)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (ident.major, ident.minor)
        assert sysfs(name, "loop/backing_file") == str(image)
        assert int(sysfs(name, "diskseq")) == ident.diskseq
        assert sysfs(name, "loop/autoclear") == "1"
        assert sysfs(name, "ro") == ("0" if writable else "1")
        assert ident.size == image.stat().st_size
        assert (ident.backing_dev, ident.backing_ino) == (image.stat().st_dev, image.stat().st_ino)
        assert os.pread(fd, 12, 0) == b"blockbroker!"
        assert not os.get_inheritable(fd)  # O_CLOEXEC
        if writable:
            os.pwrite(fd, b"written by test", 4096)
            os.fsync(fd)
    finally:
        os.close(fd)
        client.close()
    assert wait_no_loops(broker.root) == [], "AUTOCLEAR did not free the device"
    if writable:
        assert image.read_bytes()[4096 : 4096 + 15] == b"written by test"


def test_read_only_loop_refuses_writes(broker: Broker) -> None:
    image = make_image(broker.root / "ro.img")
    client = broker.client()
    fd, _ = client.loop_file(str(image), writable=False)
    try:
        # depending on the kernel, either the open for writing or the write itself fails
        with pytest.raises(OSError):
            wfd = os.open(f"/dev/{loop_name(fd)}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(wfd, b"x" * 512)
            finally:
                os.close(wfd)
    finally:
        os.close(fd)
        client.close()


def test_direct_io_and_block_size(broker: Broker) -> None:
    image = make_image(broker.root / "dio.img")
    client = broker.client()
    try:
        fd, _ = client.loop_file(str(image), writable=False, direct_io=True, block_size=4096)
        name = loop_name(fd)
        assert sysfs(name, "loop/dio") == "1"
        assert sysfs(name, "queue/logical_block_size") == "4096"
        os.close(fd)
        with pytest.raises(BrokerError) as e:
            client.loop_file(str(image), writable=False, block_size=1000)
        assert e.value.code == ErrorCode.BAD_ARGUMENT
    finally:
        client.close()


def test_same_file_twice_gets_two_devices(broker: Broker) -> None:
    image = make_image(broker.root / "twice.img")
    client = broker.client()
    fd1, id1 = client.loop_file(str(image), writable=False)
    fd2, id2 = client.loop_file(str(image), writable=False)
    assert (id1.major, id1.minor) != (id2.major, id2.minor) and id1.diskseq != id2.diskseq
    assert len(bound_loops(broker.root)) == 2
    os.close(fd1)
    os.close(fd2)
    client.close()


def test_identify(broker: Broker) -> None:
    image = make_image(broker.root / "ident.img")
    client = broker.client()
    fd, ident = client.loop_file(str(image), writable=True)
    try:
        assert client.identify(fd) == ident
        # an fd of the device that policyd opened itself, e.g. after a restart
        other = os.open(f"/dev/{loop_name(fd)}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert client.identify(other) == ident
        finally:
            os.close(other)
        with open(image, "rb") as f, pytest.raises(BrokerError) as e:
            client.identify(f.fileno())
        assert e.value.code == ErrorCode.NOT_BLOCK_DEVICE
    finally:
        os.close(fd)
        client.close()


def test_open_block(broker: Broker) -> None:
    image = make_image(broker.root / "blk.img")
    client = broker.client()
    loop_fd, loop_id = client.loop_file(str(image), writable=True)
    dev = f"/dev/{loop_name(loop_fd)}"
    try:
        fd, ident = client.open_block(dev, writable=True, expect_dev=(loop_id.major, loop_id.minor))
        st = os.fstat(fd)
        assert st.st_rdev == os.fstat(loop_fd).st_rdev
        assert (ident.diskseq, ident.size) == (loop_id.diskseq, loop_id.size)
        assert (ident.backing_dev, ident.backing_ino) == (0, 0)
        os.close(fd)
        fd, _ = client.open_block(dev, writable=False, expect_diskseq=loop_id.diskseq)
        os.close(fd)
        with pytest.raises(BrokerError) as e:
            client.open_block(dev, writable=False, expect_diskseq=loop_id.diskseq + 1)
        assert e.value.code == ErrorCode.IDENTITY_MISMATCH
        with pytest.raises(BrokerError) as e:
            client.open_block(dev, writable=False, expect_dev=(loop_id.major, loop_id.minor + 1))
        assert e.value.code == ErrorCode.IDENTITY_MISMATCH
    finally:
        os.close(loop_fd)
        client.close()


def test_open_block_refusals(broker: Broker) -> None:
    client = broker.client()
    root_dev = os.stat("/").st_dev
    root_node = f"/sys/dev/block/{os.major(root_dev)}:{os.minor(root_dev)}"
    try:
        for path, code in [
            ("/etc/hostname", ErrorCode.NOT_BLOCK_DEVICE),
            ("/dev/null", ErrorCode.NOT_BLOCK_DEVICE),
            ("/dev/does-not-exist", ErrorCode.NOT_FOUND),
            ("relative/path", ErrorCode.BAD_PATH),
        ]:
            with pytest.raises(BrokerError) as e:
                client.open_block(path, writable=False)
            assert e.value.code == code, path
        if Path(root_node).exists():  # major not in this test's allowlist [7]
            name = Path(root_node).resolve().name
            with pytest.raises(BrokerError) as e:
                client.open_block(f"/dev/{name}", writable=False)
            assert e.value.code == ErrorCode.MAJOR_NOT_ALLOWED
    finally:
        client.close()
    broker.assert_serves()


def test_unavailable_is_distinct(tmp_path: Path) -> None:
    client = BrokerClient(str(tmp_path / "nothing.sock"))
    with pytest.raises(BrokerUnavailable) as e:
        client.loop_file("/x", writable=False)
    assert e.value.code == ErrorCode.UNAVAILABLE


def test_root_disk_is_never_opened(workdir: Path) -> None:
    root_dev = os.stat("/").st_dev
    node = Path(f"/sys/dev/block/{os.major(root_dev)}:{os.minor(root_dev)}")
    if not node.exists():
        pytest.skip("the root filesystem is not on a block device here")
    disk = node.resolve().parent if (node.resolve() / "partition").exists() else node.resolve()
    names = [disk.name] + [p.name for p in disk.iterdir() if (p / "partition").exists()]
    majors = sorted({7, os.major(root_dev), *(int((disk / "dev").read_text().split(":")[0]),)})
    config = write_config(workdir / "rootdisk.toml", "root", [workdir / "root"], majors)
    broker = start_broker(config, workdir / "rootdisk.sock", workdir / "root")
    client = broker.client()
    try:
        for name in names:  # the disk and every partition, though their major is allowed
            with pytest.raises(BrokerError) as e:
                client.open_block(f"/dev/{name}", writable=False)
            assert e.value.code == ErrorCode.ROOT_DISK, name
        broker.assert_serves()
    finally:
        client.close()
        stop_broker(broker)


def test_open_block_writable_refused_on_read_only_device(broker: Broker) -> None:
    """open(O_RDWR) of a read-only block device succeeds in the kernel; the broker refuses it,
    so a guest can never be handed a writable fd that silently fails every write."""
    image = make_image(broker.root / "ro.img")
    client = broker.client()
    loop_fd, loop_id = client.loop_file(str(image), writable=False)
    dev = f"/dev/{loop_name(loop_fd)}"
    fds_before = settled_fd_count(broker, -1, timeout=0.2)  # its copy of the sent fd closed
    try:
        with pytest.raises(BrokerError) as e:
            client.open_block(dev, writable=True, expect_dev=(loop_id.major, loop_id.minor))
        assert (e.value.code, e.value.errno) == (ErrorCode.OPEN_FAILED, errno.EROFS)
        assert "read-only" in e.value.message
        assert broker.fd_count() == fds_before
        fd, _ = client.open_block(dev, writable=False, expect_diskseq=loop_id.diskseq)
        os.close(fd)
    finally:
        os.close(loop_fd)
        client.close()
    assert wait_no_loops(broker.root) == []
    broker.assert_serves()


def test_open_block_refuses_a_device_dom0_uses(broker: Broker) -> None:
    """A device the kernel reports busy for O_EXCL (mounted, swap, dm/md member, or claimed
    exclusively as here) is refused with IN_USE, whatever the root filesystem is."""
    image = make_image(broker.root / "inuse.img")
    client = broker.client()
    loop_fd, loop_id = client.loop_file(str(image), writable=True)
    dev = f"/dev/{loop_name(loop_fd)}"
    claim = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)  # what mount/swapon hold
    fds_before = settled_fd_count(broker, -1, timeout=0.2)  # its copy of the sent fd closed
    try:
        with pytest.raises(BrokerError) as e:
            client.open_block(dev, writable=False, expect_diskseq=loop_id.diskseq)
        assert (e.value.code, e.value.errno) == (ErrorCode.IN_USE, errno.EBUSY)
        assert broker.fd_count() == fds_before
        os.close(claim)
        claim = -1
        fd, _ = client.open_block(dev, writable=False, expect_diskseq=loop_id.diskseq)
        os.close(fd)
    finally:
        if claim >= 0:
            os.close(claim)
        os.close(loop_fd)
        client.close()
    assert wait_no_loops(broker.root) == []
    broker.assert_serves()
