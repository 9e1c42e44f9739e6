"""policyd's broker clients against the real broker: reconnects, unavailability, thread safety,
and the asyncio transport's cancellation.
(Kept next to the broker tests to share their broker fixture.)"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
from brokerlab import Broker, make_image, start_broker, stop_broker, wait_no_loops, write_config

from broker.protocol import ErrorCode
from policyd.brokerclient import AsyncBrokerClient, BrokerError, BrokerUnavailable, Identity

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


# -- AsyncBrokerClient: the transport policyd uses, on an event loop --------------------------


def test_async_requests_are_serialized_on_one_connection(broker: Broker) -> None:
    images = [make_image(broker.root / f"a{i}.img", 65536, bytes([80 + i])) for i in range(4)]
    client = AsyncBrokerClient(str(broker.socket_path))

    async def one(index: int) -> None:
        for _ in range(10):
            fd, ident = await client.loop_file(str(images[index]), writable=False)
            try:
                assert ident.backing_ino == images[index].stat().st_ino
                assert os.pread(fd, 1, 0) == bytes([80 + index])
                assert await client.identify(fd) == ident
            finally:
                os.close(fd)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(4)))

    try:
        asyncio.run(main())
    finally:
        client.close()
    assert wait_no_loops(broker.root) == []


def test_async_error_reply_keeps_the_connection(broker: Broker) -> None:
    client = AsyncBrokerClient(str(broker.socket_path))
    image = make_image(broker.root / "ok.img")

    async def main() -> None:
        with pytest.raises(BrokerError) as e:
            await client.loop_file(str(broker.root / "missing.img"), writable=False)
        assert e.value.code != ErrorCode.PROTOCOL
        sock = client._conn.sock
        fd, _ = await client.loop_file(str(image), writable=False)
        os.close(fd)
        assert client._conn.sock is sock  # the same connection served the next request

    try:
        asyncio.run(main())
    finally:
        client.close()


def test_async_cancelled_request_drops_the_connection_and_leaks_nothing(broker: Broker) -> None:
    """A request abandoned mid-wait (policyd's timeout) closes its connection, so the reply
    the broker sends later, and the loop fd in it, are discarded by the kernel: no fd in this
    process, no loop device left once the broker has answered."""
    image = make_image(broker.root / "late.img")
    client = AsyncBrokerClient(str(broker.socket_path))
    before = sorted(os.listdir("/proc/self/fd"))

    async def main() -> None:
        fd, _ = await client.loop_file(str(image), writable=False)  # connected
        os.close(fd)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.loop_file(str(image), writable=False), 0.3)
            assert client._conn.sock is None
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        fd, ident = await client.loop_file(str(image), writable=False)  # reconnects
        assert ident.backing_ino == image.stat().st_ino
        os.close(fd)

    try:
        asyncio.run(main())
    finally:
        client.close()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert wait_no_loops(broker.root) == []


def test_async_unavailable_then_reconnects(workdir: Path) -> None:
    root = workdir / "root"
    config = write_config(workdir / "broker.toml", "root", [root], [7])
    image = make_image(root / "r.img")
    broker = start_broker(config, workdir / "broker.sock", root)
    client = AsyncBrokerClient(str(workdir / "broker.sock"))

    async def request() -> None:
        fd, ident = await client.loop_file(str(image), writable=False)
        assert ident.backing_ino == image.stat().st_ino
        os.close(fd)

    try:
        asyncio.run(request())
        stop_broker(broker)
        with pytest.raises(BrokerUnavailable):
            asyncio.run(request())
        broker = start_broker(config, workdir / "broker.sock", root)
        asyncio.run(request())
    finally:
        client.close()
        stop_broker(broker)
    assert wait_no_loops(root) == []
