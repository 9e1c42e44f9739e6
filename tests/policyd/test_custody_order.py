"""A fresh device's fd is in the fd store before the commit that names it in XenStore, and out
of it again when that commit fails: a policyd killed at any point between them leaves no
XenStore node naming a device that only the dead process held. Unit level: the exporter's
_publish with a datagram socket standing in for systemd's notify socket (the byte format is
tested in test_fdstore.py, the store itself under real systemd in tests/stack)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest

from policyd import errors
from policyd.brokerclient import AsyncBrokerClient, Identity
from policyd.exports import exporter as exporter_module
from policyd.exports.brokercalls import BrokerCalls
from policyd.exports.custody import Custody
from policyd.exports.exporter import Exporter, Resolver, backing_name
from policyd.exports.fdstore import FdStore
from policyd.exports.reconcile import resolve_kept
from policyd.exports.registry import Registry, file_key
from policyd.exports.sources import Sources
from policyd.xenstore.connection import XS_TIMEOUT_S
from policyd.xenstore.store import XenStore


class Listener:
    def export_added(self, record: object) -> None: ...
    def export_removed(self, record: object) -> None: ...
    def export_changed(self, record: object, names: list[str]) -> None: ...
    def export_count_changed(self, count: int) -> None: ...


async def no_policy(*_: object) -> None:
    return None


def offline_exporter(
    tmp_path: Path,
    registry: Registry,
    custody: Custody,
    *,
    xs_timeout_s: float = XS_TIMEOUT_S,
    resolver: Resolver | None = None,
) -> Exporter:
    """An Exporter whose XenStore and broker sockets do not exist (every request fails)."""
    calls = BrokerCalls(AsyncBrokerClient(str(tmp_path / "no-broker")))
    return Exporter(
        xenstore=XenStore(str(tmp_path / "no-xenstored"), timeout_s=xs_timeout_s),
        broker=calls,
        registry=registry,
        sources=Sources(registry, calls),
        policy_check=no_policy,
        listener=Listener(),
        custody=custody,
        backend_domid=0,
        sysfs_root=str(tmp_path),
        resolver=resolver,
    )


def notes(sock: socket.socket) -> list[str]:
    found = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            for _level, _type, fds in ancdata:
                for i in range(0, len(fds), 4):
                    os.close(int.from_bytes(fds[i : i + 4], "little"))
            found.append(data.decode())
    return found


@pytest.mark.parametrize("outcome", ["committed", "failed", "unknown"])
def test_the_fd_is_stored_before_the_commit_and_unstored_if_it_fails(
    tmp_path: Path, outcome: str
) -> None:
    notify = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.setblocking(False)
    registry = Registry()
    custody = Custody(FdStore(str(notify)))

    async def scenario() -> None:
        exporter = offline_exporter(tmp_path, registry, custody)
        fd = os.open("/dev/null", os.O_RDONLY)
        backing = registry.new_backing(
            file_key(1, 2), fd, Identity(7, 3, 42, 0, 1, 2), "file", False, (), "/dev/loop3"
        )
        name = backing_name(backing)

        async def commit() -> int:
            # what a killed policyd would leave: is the fd in the store while XenStore may
            # name it?
            assert notes(server) == [f"FDSTORE=1\nFDNAME={name}"]
            if outcome == "failed":
                raise errors.XenStoreError("commit refused")
            if outcome == "unknown":
                raise errors.CommitUnknown("connection lost during the commit")
            return 1

        with contextlib.ExitStack() as undo:
            undo.callback(os.close, fd)
            with contextlib.suppress(errors.XenStoreError):
                await exporter._publish(undo, backing, 1, commit())
        after = notes(server)
        if outcome == "failed":  # out of the store, and closed
            assert after == [f"FDSTOREREMOVE=1\nFDNAME={name}"]
            assert name not in custody.held
            with pytest.raises(OSError):
                os.fstat(fd)
        else:  # held: in custody and in the store
            assert after == [] and custody.held == {name: fd}
            custody.close_all()

    asyncio.run(scenario())
    server.close()


def test_a_kept_fd_stays_kept_while_xenstore_stays_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving an fd kept after a commit of unknown outcome is bounded: while XenStore does
    not answer it is retried with back-off, then the fd stays held (in the fd store) for the
    next start's reconciliation."""
    monkeypatch.setattr(exporter_module, "RESOLVE_FIRST_S", 0.01)
    monkeypatch.setattr(exporter_module, "RESOLVE_MAX_PAUSE_S", 0.05)
    monkeypatch.setattr(exporter_module, "RESOLVE_WAIT_S", 0.3)
    registry = Registry()
    custody = Custody(FdStore(""))  # no service manager

    async def scenario() -> str:
        exporter = offline_exporter(
            tmp_path, registry, custody, xs_timeout_s=0.1, resolver=resolve_kept
        )
        fd = os.open("/dev/null", os.O_RDONLY)
        custody.hold("bb1-file-7-3-2a", fd)
        return await exporter.resolve_unknown(5, "bb1-file-7-3-2a", Identity(7, 3, 42, 0, 1, 2))

    assert asyncio.run(scenario()) == "kept"
    assert list(custody.held) == ["bb1-file-7-3-2a"]
    custody.close_all()
