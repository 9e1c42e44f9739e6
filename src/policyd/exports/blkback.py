"""Detects that xen-blkback has opened an export's device (its sysfs `physical_device`).

Unprivileged policyd code; reads sysfs only. The sysfs root is a setting, so the host lane and the
Xen lane run the same code. There is no uevent for this, so the watcher polls, with a bounded
interval (50 ms growing to 1 s), and only while some export is still waiting. Without
`<root>/bus/xen-backend` (a host without blkback) exports are "no-blkback" at once instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from policyd import logfmt
from policyd.exports.registry import STATE_CONNECTED, STATE_NO_BLKBACK, STATE_WAITING, ExportRecord

POLL_INTERVAL_S = 0.05
MAX_POLL_INTERVAL_S = 1.0
MAX_SYSFS_BYTES = 64


class BlkbackWatcher:
    """Polls the sysfs node of each export that waits for blkback; `changed(record)` is called
    when its state moves (waiting -> connected)."""

    def __init__(self, sysfs_root: str, changed: Callable[[ExportRecord], None]) -> None:
        self.sysfs_root = sysfs_root
        self._changed = changed
        self._waiting: dict[int, ExportRecord] = {}
        self._task: asyncio.Task[None] | None = None
        self._interval = POLL_INTERVAL_S

    @property
    def present(self) -> bool:
        return os.path.isdir(os.path.join(self.sysfs_root, "bus", "xen-backend"))

    def initial_state(self) -> str:
        return STATE_WAITING if self.present else STATE_NO_BLKBACK

    def node(self, record: ExportRecord) -> str:
        return os.path.join(
            self.sysfs_root,
            "bus",
            "xen-backend",
            "devices",
            f"vbd-{record.frontend_domid}-{record.devid}",
            "physical_device",
        )

    def holds(self, record: ExportRecord) -> bool:
        """Whether blkback still shows the backend device (it has the device open)."""
        return os.path.exists(self.node(record))

    def watch(self, record: ExportRecord) -> None:
        if record.state != STATE_WAITING:
            return
        self._waiting[record.number] = record
        self._interval = POLL_INTERVAL_S
        self._check(record)
        if self._waiting and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def forget(self, record: ExportRecord) -> None:
        self._waiting.pop(record.number, None)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        """Check every waiting export; the interval grows from POLL_INTERVAL_S to
        MAX_POLL_INTERVAL_S while nothing changes, and starts over with each new export."""
        self._interval = POLL_INTERVAL_S
        while self._waiting:
            await asyncio.sleep(self._interval)
            for record in list(self._waiting.values()):
                self._check(record)
            self._interval = min(self._interval * 2, MAX_POLL_INTERVAL_S)

    def _check(self, record: ExportRecord) -> None:
        try:
            with open(self.node(record), "rb") as f:
                untrusted = f.read(MAX_SYSFS_BYTES)
        except FileNotFoundError:
            return
        except OSError as e:
            logfmt.warning("cannot read blkback state", path=self.node(record), error=e)
            return
        ident = record.backing.identity
        expected = f"{ident.major:x}:{ident.minor:x}"
        if untrusted.strip() != expected.encode():
            with contextlib.suppress(UnicodeDecodeError):
                logfmt.warning(
                    "blkback opened another device than exported",
                    export=record.object_path,
                    expected=expected,
                    found=untrusted.strip().decode("ascii"),
                )
            return
        self._waiting.pop(record.number, None)
        record.state = STATE_CONNECTED
        logfmt.info("blkback opened the device", export=record.object_path)
        self._changed(record)
