"""A blocking wrapper around `AsyncClient` for code without an asyncio loop (GTK/Qt tools, scripts).

Runs as the calling user; talks to policyd over the bus. The asyncio loop lives in one private
daemon thread per `Client`; each method submits a coroutine and waits for its result, so errors
are the same `client.errors` exceptions. `subscribe` callbacks run in that thread: a GUI hands
them to its own main loop (GLib.idle_add, QMetaObject.invokeMethod, ...). `events()` is a
blocking iterator for scripts.

    with Client() as bb:
        for exp in bb.list_exports():
            print(exp.export, exp.loop_device)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from client.api import DEFAULT_TIMEOUT, AsyncClient
from client.model import Event, ExportInfo, RequestInfo, Status
from client.watch import EventCallback, Subscription

T = TypeVar("T")


class SyncSubscription:
    """The blocking face of a `Subscription`; `exports`/`status` are read from the loop thread."""

    def __init__(self, client: Client, sub: Subscription) -> None:
        self._client = client
        self._sub = sub

    @property
    def exports(self) -> dict[str, ExportInfo]:
        """A copy, taken on the loop thread (which is the one that updates it)."""
        return self._client._run(self._copy_exports())

    async def _copy_exports(self) -> dict[str, ExportInfo]:
        return dict(self._sub.exports)

    @property
    def requests(self) -> dict[str, RequestInfo]:
        return self._client._run(self._copy_requests())

    async def _copy_requests(self) -> dict[str, RequestInfo]:
        return dict(self._sub.requests)

    @property
    def status(self) -> Status | None:
        return self._sub.status

    def close(self) -> None:
        if not self._client.closed:
            self._client._run(self._sub.close())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Blocking client; one bus connection, one loop thread. Use as a context manager."""

    def __init__(self, address: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="blockbroker-client", daemon=True
        )
        self._thread.start()
        self.closed = False
        try:
            self._async = self._run(AsyncClient.connect(address, timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self.closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self.closed:
            return
        self._run(self._async.close())
        self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def export(
        self,
        source: str | int,
        to: str,
        read_only: bool = True,
        devid: int | None = None,
        direct_io: bool | None = None,
    ) -> ExportInfo:
        return self._run(self._async.export(source, to, read_only, devid, direct_io))

    def get_export(self, target: str) -> ExportInfo:
        return self._run(self._async.get_export(target))

    def list_exports(self) -> list[ExportInfo]:
        return self._run(self._async.list_exports())

    def detach(self, target: ExportInfo | str) -> None:
        self._run(self._async.detach(target))

    def attach(self, backend_path: str) -> str:
        return self._run(self._async.attach(backend_path))

    def detach_backend(self, backend_path: str) -> None:
        self._run(self._async.detach_backend(backend_path))

    def status(self) -> Status:
        return self._run(self._async.status())

    def list_requests(self) -> list[RequestInfo]:
        return self._run(self._async.list_requests())

    def get_request(self, target: str) -> RequestInfo:
        return self._run(self._async.get_request(target))

    def approve(self, target: RequestInfo | str) -> None:
        self._run(self._async.approve(target))

    def deny(self, target: RequestInfo | str) -> None:
        self._run(self._async.deny(target))

    def subscribe(self, callback: EventCallback) -> SyncSubscription:
        """Call `callback(event)` (in the client's loop thread) for every change."""
        return SyncSubscription(self, self._run(self._async.subscribe(callback)))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Block for events; stops after `timeout` seconds without one (None: never)."""
        inbox: queue.Queue[Event] = queue.Queue()
        with self.subscribe(inbox.put):
            while True:
                try:
                    yield inbox.get(timeout=timeout)
                except queue.Empty:
                    return
