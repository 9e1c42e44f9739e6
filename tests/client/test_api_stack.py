"""The Python API (sync wrapper and asyncio client) against the real stack, including watching.

Runs as root with real daemons. Exports are checked against XenStore and /sys/block/loopN.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.stack import Stack
from vbd import (
    leaked_loops,
    loop_backing_file,
    loop_diskseq,
    physical_device,
    wait_loop_released,
)

from client import errors
from client.api import AsyncClient
from client.model import Event, ExportInfo
from client.sync import Client

pytestmark = [pytest.mark.root, pytest.mark.daemon]


@pytest.fixture
def bus_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", stack.bus_address)


@pytest.fixture
def client(stack: Stack, bus_env: None) -> Iterator[Client]:
    with Client() as bb:
        yield bb
        leftovers = [e for e in bb.list_exports() if e.source.startswith(str(stack.image_dir))]
        for export in leftovers:
            bb.detach(export)
    assert not leftovers, f"test left exports behind: {leftovers}"


@pytest.fixture
def image(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = stack.make_image(f"api-{request.node.name}.img", 1 << 20)
    yield path
    path.unlink()


def check_exported(stack: Stack, info: ExportInfo, image: Path) -> None:
    assert loop_backing_file(info.loop_device) == str(image)
    assert loop_diskseq(info.loop_device) == info.diskseq
    assert stack.xs_read(f"{info.backend_path}/physical-device") == physical_device(
        info.major, info.minor
    )
    assert stack.xs_read(f"{info.backend_path}/diskseq") == f"{info.diskseq:x}"


def test_sync_export_get_list_detach(stack: Stack, client: Client, image: Path) -> None:
    info = client.export(str(image), to="work")
    assert info.mode == "r"
    assert info.source_kind == "file"
    assert info.frontend_domid == 1
    assert info.backend_domain == "Domain-0"
    assert info.since <= time.time_ns() // 1000
    check_exported(stack, info, image)
    assert client.get_export(info.id) == info
    assert info in client.list_exports()
    status = client.status()
    assert status.export_count >= 1
    client.detach(info)
    assert not stack.xs_exists(info.backend_path)
    assert wait_loop_released(info.loop_device, info.diskseq)
    with pytest.raises(errors.NotFound) as exc:
        client.get_export(info.export)
    assert exc.value.dbus_name.startswith("org.")
    with pytest.raises(errors.NotFound):
        client.detach(info)


def test_read_only_exports_of_one_file_share_a_loop(
    stack: Stack, client: Client, image: Path
) -> None:
    first = client.export(str(image), to="work")
    second = client.export(str(image), to="untrusted")
    assert (first.loop_device, first.diskseq) == (second.loop_device, second.diskseq)
    assert first.export != second.export
    client.detach(first)
    assert loop_backing_file(second.loop_device) == str(image)  # still held for the second
    client.detach(second.id)
    assert wait_loop_released(second.loop_device, second.diskseq)


def test_errors_are_mapped(stack: Stack, client: Client, image: Path) -> None:
    with pytest.raises(errors.UnknownDomain):
        client.export(str(image), to="nope")
    with pytest.raises(errors.NotFound):
        client.detach("/local/domain/0/backend/vbd/1/4242")
    with pytest.raises(errors.UsageError):
        client.export(str(image), to="")
    with pytest.raises(errors.UsageError):
        client.detach("bogus")
    rw = client.export(str(image), to="work", read_only=False)
    try:
        with pytest.raises(errors.Busy):
            client.export(str(image), to="untrusted")  # a rw file is never shared
    finally:
        client.detach(rw)
    assert leaked_loops(stack) == []


def test_subscribe_sees_added_changed_removed(stack: Stack, client: Client, image: Path) -> None:
    events: list[Event] = []
    arrived = threading.Condition()

    def on_event(event: Event) -> None:
        with arrived:
            events.append(event)
            arrived.notify_all()

    def wait_for(pred: Callable[[Event], bool]) -> Event:
        with arrived:
            assert arrived.wait_for(lambda: any(pred(e) for e in events), timeout=10)
            return next(e for e in events if pred(e))

    with client.subscribe(on_event) as sub:
        assert sub.status is not None
        before = set(sub.exports)
        info = client.export(str(image), to="work")
        added = wait_for(lambda e: e.kind == "added" and e.path == info.export)
        assert added.export is not None
        assert added.export.loop_device == info.loop_device
        wait_for(lambda e: e.kind == "status" and e.status is not None)
        assert info.export in sub.exports

        # blkback "opens" the device: policyd polls the (stack's) sysfs physical_device node
        if info.state == "waiting-for-blkback":
            node = (
                stack.sysfs_root / f"bus/xen-backend/devices/vbd-{info.frontend_domid}-{info.devid}"
            )
            node.mkdir(parents=True)
            (node / "physical_device").write_text(f"{info.major:x}:{info.minor:x}\n")
            changed = wait_for(lambda e: e.kind == "changed" and e.path == info.export)
            assert changed.export is not None
            assert changed.export.state == "connected"
            assert "State" in changed.changed
            assert sub.exports[info.export].state == "connected"
            closer = _close_backend_when_asked(stack, info.backend_path)
            client.detach(info)
            closer.join()
            (node / "physical_device").unlink()
            node.rmdir()
        else:
            client.detach(info)
        removed = wait_for(lambda e: e.kind == "removed" and e.path == info.export)
        assert removed.export is not None
        assert removed.export.diskseq == info.diskseq
        assert set(sub.exports) == before
    assert wait_loop_released(info.loop_device, info.diskseq)


def _close_backend_when_asked(stack: Stack, be: str) -> threading.Thread:
    """Play blkback on detach: once policyd writes state=5 (Closing), answer 6 (Closed)."""

    def run() -> None:
        from pyxs import Client as Xs

        with Xs(unix_socket_path=str(stack.xenstore_path)) as xs:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if xs.exists(f"{be}/state".encode()) and xs.read(f"{be}/state".encode()) == b"5":
                    xs.write(f"{be}/state".encode(), b"6")
                    return
                time.sleep(0.005)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_events_see_service_vanish_and_return(stack: Stack, bus_env: None) -> None:
    inbox: queue.Queue[Event] = queue.Queue()
    with Client() as bb, bb.subscribe(inbox.put) as sub:
        # From this thread: the harness ties a daemon's life to the thread that started it.
        stack.restart_policyd()
        seen: list[Event] = []
        back = False
        while not (back and seen[-1].kind == "status"):  # the fresh snapshot after the restart
            seen.append(inbox.get(timeout=10))
            back = back or (seen[-1].kind == "service" and bool(seen[-1].online))
        kinds = [(e.kind, e.online) for e in seen if e.kind == "service"]
        assert kinds == [("service", False), ("service", True)]
        assert bb.status().xenstore_connected
        assert set(sub.exports) == {e.export for e in bb.list_exports()}
        assert sub.status is not None


def test_async_client_export_and_watch(stack: Stack, bus_env: None, image: Path) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect() as bb:
            watch = bb.watch()
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.1)  # let the subscription's match rules land
            info = await bb.export(str(image), to="untrusted", devid=51760)
            assert info.devid == 51760
            event = await asyncio.wait_for(first, 10)
            assert event.kind in ("added", "status")
            check_exported(stack, info, image)
            await bb.detach(info.export)
            await watch.aclose()
            with pytest.raises(errors.NotFound):
                await bb.detach_backend(info.backend_path)

    asyncio.run(scenario())


def test_async_export_by_fd(stack: Stack, bus_env: None, image: Path) -> None:
    """ExportFd: the caller opens a block device with its own rights and passes the fd."""
    import subprocess

    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)  # autoclear-like: fd holds it

    async def scenario() -> ExportInfo:
        async with await AsyncClient.connect() as bb:
            info = await bb.export(fd, to="work")
            await bb.detach(info)
            return info

    try:
        info = asyncio.run(scenario())
    finally:
        os.close(fd)
    assert info.source_kind == "block"
    assert info.source.startswith("fd:")
    assert (info.major, info.minor) == (
        os.major(os.stat(loop).st_rdev),
        os.minor(os.stat(loop).st_rdev),
    )
    assert not stack.xs_exists(info.backend_path)


def test_connect_failure_is_service_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.ServiceUnavailable, match="cannot connect"):
        Client(address=f"unix:path={tmp_path}/nothing")


def test_blocking_events_iterator(stack: Stack, client: Client, image: Path) -> None:
    def churn() -> None:
        time.sleep(0.5)  # after events() subscribed
        client.detach(client.export(str(image), to="work"))

    worker = threading.Thread(target=churn)
    worker.start()
    kinds = []
    for event in client.events(timeout=10):
        kinds.append(event.kind)
        if event.kind == "removed":
            break
    worker.join()
    # status events (BrokerConnected on the stack's first broker request, ExportCount) may
    # come in between; the export's own events come in order
    assert [kind for kind in kinds if kind != "status"] == ["added", "removed"], kinds
    assert list(client.events(timeout=0.2)) == []  # quiet: ends after the timeout
