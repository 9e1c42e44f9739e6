"""The watch on frontend domains: exports whose frontend domain was destroyed are detached.

Unprivileged policyd code. libxl removes /local/domain/<domid> when it destroys a domain, but it
does not know the vbds Export wrote, so their nodes and held devices would stay. policyd watches
each frontend's `name` node (dom0's: the guest cannot write it) while it has exports there; when
the node is gone, `on_gone(domid)` detaches those exports and the watch is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from policyd import errors, logfmt
from policyd.xenstore.store import XenStore

FRONTEND_TOKEN = "frontend-"  # watch tokens: frontend-<domid>


class FrontendWatch:
    """One XenStore watch per frontend domain with exports; events are checked in one task."""

    def __init__(self, xenstore: XenStore, on_gone: Callable[[int], Awaitable[None]]) -> None:
        self.xenstore = xenstore
        self._on_gone = on_gone
        self._to_check: set[int] = set()
        self._sweep_task: asyncio.Task[None] | None = None

    async def watch(self, fe_domid: int) -> None:
        token = f"{FRONTEND_TOKEN}{fe_domid}"
        if token in self.xenstore.watches:
            return
        try:
            await self.xenstore.watch(f"/local/domain/{fe_domid}/name", token, self._event)
        except errors.XenStoreError as e:
            logfmt.warning(
                "cannot watch the frontend domain; its exports stay if it dies",
                frontend=fe_domid,
                error=e,
            )

    def _event(self, path: str, token: str) -> None:
        """A watch fired (on the event loop): note the domain, check it in one task."""
        domid = token.removeprefix(FRONTEND_TOKEN)
        if domid == token or not domid.isdigit():
            return
        self._to_check.add(int(domid))
        if self._sweep_task is None or self._sweep_task.done():
            self._sweep_task = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._to_check:
            fe_domid = self._to_check.pop()
            try:
                if await self.xenstore.read_one(f"/local/domain/{fe_domid}/name") is not None:
                    continue  # alive (a watch also fires once when it is set)
            except errors.XenStoreError:
                continue  # a new connection sets the watches again, and they fire again
            await self._on_gone(fe_domid)
            with contextlib.suppress(errors.XenStoreError):
                await self.xenstore.unwatch(f"{FRONTEND_TOKEN}{fe_domid}")

    def stop(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
