"""The desktop tool's D-Bus side: an asyncio loop (dbus-fast) in its own thread, results handed
to the GUI's main loop.

Runs as the calling user; no privilege. PyGObject 3.42 (Debian 12) has no asyncio event loop
for GLib, and the GLib-asyncio bridges (gbulb) are unmaintained and not in Debian: the simplest
correct way is the one `client.sync` uses, one private thread running the asyncio loop. GTK is
touched only on the main thread: every result and every bus event reaches the GUI through
`post` (GLib.idle_add in the app), so widgets never see the loop thread. No gi import here:
tests drive this class with a plain queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from client.api import AsyncClient
from client.errors import BlockBrokerError
from client.model import Event, ExportInfo, RequestInfo, Status
from client.watch import Subscription

T = TypeVar("T")
Post = Callable[[Callable[[], None]], None]  # runs a function on the GUI's main loop
STOP_TIMEOUT_S: Final = 2.0


class Snapshot:
    """What the service holds when watching starts (copied on the loop thread)."""

    def __init__(self, sub: Subscription) -> None:
        self.exports: dict[str, ExportInfo] = dict(sub.exports)
        self.requests: dict[str, RequestInfo] = dict(sub.requests)
        self.status: Status | None = sub.status


class Backend:
    """One bus connection and one subscription, driven from the GUI thread."""

    def __init__(self, post: Post, address: str | None = None) -> None:
        self._post = post
        self._address = address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="blockbroker-dbus", daemon=True
        )
        self._client: AsyncClient | None = None
        self._sub: Subscription | None = None

    def start(
        self,
        on_event: Callable[[Event], None],
        on_ready: Callable[[Snapshot | None, BlockBrokerError | None], None],
    ) -> None:
        """Connect and subscribe; `on_ready` gets the snapshot (or the error), then `on_event`
        gets each change: both on the GUI thread."""
        self._thread.start()

        def event(ev: Event) -> None:  # on the loop thread
            self._post(lambda: on_event(ev))

        async def connect() -> Snapshot:
            self._client = await AsyncClient.connect(self._address)
            self._sub = await self._client.subscribe(event)
            return Snapshot(self._sub)

        self.submit(connect(), on_ready)

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        done: Callable[[T | None, BlockBrokerError | None], None],
    ) -> None:
        """Run `coro` on the loop; `done(result, error)` on the GUI thread. An exception that
        is not the API's own is a bug: it is shown as BlockBrokerError with its type's name."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)

        def finished(fut: Any) -> None:  # concurrent.futures.Future, on the loop thread
            error: BlockBrokerError | None = None
            result = None
            try:
                result = fut.result()
            except BlockBrokerError as e:
                error = e
            except Exception as e:  # a bug still reaches the window, under its type's name
                error = BlockBrokerError(f"{type(e).__name__}: {e}")
            self._post(lambda: done(result, error))

        future.add_done_callback(finished)

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise BlockBrokerError("not connected to the bus")
        return self._client

    def approve(
        self, req: RequestInfo, done: Callable[[None, BlockBrokerError | None], None]
    ) -> None:
        self.submit(self._with_client(lambda c: c.approve(req)), done)

    def deny(self, req: RequestInfo, done: Callable[[None, BlockBrokerError | None], None]) -> None:
        self.submit(self._with_client(lambda c: c.deny(req)), done)

    def detach(
        self, exp: ExportInfo, done: Callable[[None, BlockBrokerError | None], None]
    ) -> None:
        self.submit(self._with_client(lambda c: c.detach(exp)), done)

    async def _with_client(self, call: Callable[[AsyncClient], Coroutine[Any, Any, None]]) -> None:
        await call(self.client)

    def stop(self) -> None:
        """Close the subscription and the connection, then end the loop thread."""
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._sub is not None:
                await self._sub.close()
            if self._client is not None:
                await self._client.close()

        future = asyncio.run_coroutine_threadsafe(close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(STOP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
