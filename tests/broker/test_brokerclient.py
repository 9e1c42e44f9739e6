"""policyd's BrokerClient against the real broker: reconnects, unavailability, thread safety.
(Kept next to the broker tests to share their broker fixture.)"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from brokerlab import Broker, make_image, start_broker, stop_broker, wait_no_loops, write_config

from broker.protocol import ErrorCode
from policyd.brokerclient import BrokerUnavailable, Identity

pytestmark = pytest.mark.root


def test_reconnects_after_broker_restart(workdir: Path) -> None:
    root = workdir / "root"
    config = write_config(workdir / "broker.toml", "root", [root], [7])
    image = make_image(root / "r.img")
    broker = start_broker(config, workdir / "broker.sock", root)
    client = broker.client()
    try:
        fd, _ = client.loop_file(str(image), writable=False)
        os.close(fd)
        stop_broker(broker)
        with pytest.raises(BrokerUnavailable) as e:
            client.loop_file(str(image), writable=False)
        assert e.value.code == ErrorCode.UNAVAILABLE
        broker = start_broker(config, workdir / "broker.sock", root)
        fd, ident = client.loop_file(str(image), writable=False)  # a new connection, transparently
        assert ident.backing_ino == image.stat().st_ino
        os.close(fd)
    finally:
        client.close()
        stop_broker(broker)
    assert wait_no_loops(root) == []


def test_thread_safe(broker: Broker) -> None:
    images = [make_image(broker.root / f"t{i}.img", 65536, bytes([70 + i])) for i in range(4)]
    client = broker.client()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(15):
                fd, ident = client.loop_file(str(images[index]), writable=False)
                try:
                    assert ident.backing_ino == images[index].stat().st_ino
                    assert os.pread(fd, 1, 0) == bytes([70 + index])
                    assert client.identify(fd) == ident
                finally:
                    os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    assert errors == []


def test_open_block_identity_round_trip(broker: Broker) -> None:
    image = make_image(broker.root / "b.img")
    client = broker.client()
    try:
        loop_fd, loop_id = client.loop_file(str(image), writable=True)
        name = Path(f"/sys/dev/block/{loop_id.major}:{loop_id.minor}").resolve().name
        fd, ident = client.open_block(
            f"/dev/{name}",
            writable=False,
            expect_dev=(loop_id.major, loop_id.minor),
            expect_diskseq=loop_id.diskseq,
        )
        assert ident == Identity(loop_id.major, loop_id.minor, loop_id.diskseq, loop_id.size, 0, 0)
        assert client.identify(fd) == loop_id  # IDENTIFY reports the backing file of a loop fd
        os.close(fd)
        os.close(loop_fd)
    finally:
        client.close()
