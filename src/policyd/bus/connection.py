"""policyd's bus connection: ObjectManager signals from the manager's path, held until replies.

Unprivileged policyd code; it only changes where and when policyd's own messages are sent (and
that a full socket buffer waits instead of ending the connection: PatientWriter).
"""

from __future__ import annotations

import array
import asyncio
import socket
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.send_reply import SendReply
from dbus_fast.service import ServiceInterface

from policyd.bus.interfaces import (
    ExportInterface,
    ManagerInterface,
    RequestInterface,
    export_variants,
    request_variants,
)
from policyd.names import (
    EXPORT_PATH_PREFIX,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    REQUEST_PATH_PREFIX,
)

JOIN_MAX = 64  # messages joined into one send() at most


class PatientWriter(_MessageWriter):
    """dbus-fast's writer, except that a send() the kernel refuses with EAGAIN waits for the
    socket to be writable again.

    dbus-fast 5.2's writer sends at once when its queue is empty, even while the rest of an
    earlier message is still waiting for room; if the socket buffer is still full, send()
    raises BlockingIOError and the writer ends the whole connection. A burst of messages does
    that: with a thousand exports, the signals of start-up reconciliation and a large
    GetManagedObjects reply ended policyd's bus connection (bench/bench_scale.py). The loop
    below is dbus-fast's write_callback with that one case handled, and one more change:
    messages queued together without fds go out in one send() (send_all: a reply and the
    signals it causes), each send() being a wake-up of dbus-daemon.
    """

    more_futs: tuple[asyncio.Future[Any] | None, ...] = ()  # of messages joined to self.buf's

    def send_all(self, messages: list[Message]) -> None:
        """Queue `messages` and write them at once, joined into one send() where they carry no
        fds; the rest waits for the socket to be writable, as schedule_write does it."""
        for msg in messages:
            self.buffer_message(msg, None)
        self.write_callback(remove_writer=False)
        if self.buf is not None or self.messages:
            assert self.fd is not None
            self.loop.add_writer(self.fd, self.write_callback)

    def write_callback(self, remove_writer: bool = True) -> None:
        sock = self.sock
        assert sock is not None and self.fd is not None  # the writer exists once connected
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    more: list[asyncio.Future[Any] | None] = []
                    if not unix_fds and self.messages and not self.messages[0][1]:
                        parts = [buf]  # messages without fds in a row: one send()
                        while self.messages and not self.messages[0][1] and len(parts) < JOIN_MAX:
                            part, _, part_fut = self.messages.popleft()
                            parts.append(part)
                            more.append(part_fut)
                        buf = bytearray(b"".join(parts))
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                    self.more_futs = tuple(more)
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        rights = array.array("i", self.unix_fds)
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                        self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    # the buffer is full: the caller (schedule_write) or the selector keeps
                    # this writer registered, and the fds go with the message's first byte
                    return
                if self.offset < len(self.buf):
                    return  # wait for writable
                self.buf = None
                for done in [self.fut, *self.more_futs]:
                    _settle(done)
        except Exception as e:
            for failed in [self.fut, *self.more_futs]:
                _settle(failed, None if self.bus._user_disconnect else e)
            self.bus._finalize(e)


def _settle(fut: asyncio.Future[Any] | None, error: Exception | None = None) -> None:
    if fut is not None and not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class PolicydBus(MessageBus):
    """A MessageBus whose ObjectManager signals come from the manager's path.

    dbus-fast sends InterfacesAdded/Removed from the exported object's own path; the D-Bus
    specification (and GDBus/sd-bus clients) expect them from the ObjectManager's path.

    Signals that the task handling a method call emits are held and sent, in order, right
    after its reply (the caller waits for the reply, not for them), together with it in one
    send(): see hold_signals. Signals from anywhere else (other tasks, timers) go out at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[asyncio.Task[Any] | None, list[Message]] = {}

    async def connect(self) -> PolicydBus:
        await super().connect()
        if type(self._writer) is _MessageWriter:  # idle once Hello is answered: same state
            self._writer.__class__ = PatientWriter
        return self

    def hold_signals(self) -> None:
        """Hold the current task's reply and signals until it calls send_held() (which it
        must, right after its reply)."""
        self._held[asyncio.current_task()] = []

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        # a task's method calls (to the bus, to polkit) go out at once: it awaits their replies
        if self._held and msg.message_type is not MessageType.METHOD_CALL:
            queue = self._held.get(asyncio.current_task())
            if queue is not None:
                queue.append(msg)
                done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
        return super().send(msg)

    def send_held(self) -> None:
        """The held reply, then the held signals, in order: in one send() where they fit."""
        held = self._held.pop(asyncio.current_task(), [])
        if not held or self._disconnected:
            return
        writer = self._writer
        if not isinstance(writer, PatientWriter):
            for msg in held:
                super().send(msg)
            return
        for msg in held:
            if not msg.serial:
                msg.serial = self.next_serial()
        writer.send_all(held)

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: SendReply) -> None:
        """GetManagedObjects, the same answer as dbus-fast's, built from the records directly.

        dbus-fast asks each property getter of each object, inspects each one for a coroutine,
        and after each object's answer checks the whole result for completeness (quadratic in
        the number of objects): ~50 ms for a thousand exports. The export and request objects'
        values come from the same functions as their InterfacesAdded signals. A call at "/"
        (which includes the Manager) goes dbus-fast's way.
        """
        path = msg.path or "/"
        prefix = path + "/" if path != "/" else "/"
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for node, interfaces in self._path_exports.items():
            if not node.startswith(prefix):
                continue
            entry: dict[str, dict[str, Any]] = {}
            for name, interface in interfaces.items():
                if isinstance(interface, ExportInterface):
                    entry[name] = export_variants(interface.record)
                elif isinstance(interface, RequestInterface):
                    entry[name] = request_variants(interface.req)
                else:
                    super()._default_get_managed_objects_handler(msg, send_reply)
                    return
            result[node] = entry
        send_reply(Message.new_method_return(msg, "a{oa{sa{sv}}}", [result]))

    def _interface_signal_notify(
        self,
        interface: ServiceInterface,
        interface_name: str,
        member: str,
        signature: str,
        body: list[Any],
        unix_fds: list[int] | None = None,
    ) -> None:
        """A signal of an exported interface (PropertiesChanged), sent from its object's path.

        dbus-fast finds that path by scanning every exported object, for every signal: with a
        thousand exports that scan ran on each ExportCount change, i.e. on every Export and
        Detach. policyd's interfaces know their path; the signal goes out as dbus-fast's would,
        and anything not exported where its path says goes dbus-fast's way.
        """
        path = _own_path(interface)
        exported = self._path_exports.get(path, {}) if path is not None else {}
        if path is None or exported.get(interface.name) is not interface:
            super()._interface_signal_notify(
                interface, interface_name, member, signature, body, unix_fds or []
            )
            return
        self.send(
            Message.new_signal(
                path=path,
                interface=interface_name,
                member=member,
                signature=signature,
                body=body,
                unix_fds=unix_fds or [],
            )
        )

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if isinstance(interface, ExportInterface):
            variants = export_variants(interface.record)
        elif isinstance(interface, RequestInterface):
            variants = request_variants(interface.req)
        else:
            return
        if not self._disconnected:
            self.send(
                Message.new_signal(
                    MANAGER_PATH,
                    OBJECT_MANAGER_IFACE,
                    "InterfacesAdded",
                    "oa{sa{sv}}",
                    [path, {interface.name: variants}],
                )
            )

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if path.startswith((EXPORT_PATH_PREFIX, REQUEST_PATH_PREFIX)) and not self._disconnected:
            self.send(
                Message.new_signal(
                    MANAGER_PATH,
                    OBJECT_MANAGER_IFACE,
                    "InterfacesRemoved",
                    "oas",
                    [path, removed_interfaces],
                )
            )


def _own_path(interface: ServiceInterface) -> str | None:
    if isinstance(interface, ExportInterface):
        return interface.record.object_path
    if isinstance(interface, RequestInterface):
        return interface.req.object_path
    if isinstance(interface, ManagerInterface):
        return MANAGER_PATH
    return None
