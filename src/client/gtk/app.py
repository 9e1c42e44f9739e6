"""`blockbroker-gtk`: one window with the exports and the pending export requests (GTK 4).

Runs as the calling user at a dom0 desktop; no privilege of its own. Approve, Deny and Detach
are the API's calls: policyd asks polkit, whose agent (the desktop's) authenticates the person.
The lists follow the service's signals (`client.watch`): nothing is polled; a once-a-second
timer only redraws each request's "time left" from the local clock. Text a VM supplied reaches
the window through `client.gtk.text` (plain labels, never markup). Started by the launcher in
`client.gtk` under the system Python (PyGObject is Debian's).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, Final

import gi

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gio, GLib, Gtk  # noqa: E402

from client.errors import BlockBrokerError  # noqa: E402
from client.gtk import text  # noqa: E402
from client.gtk.backend import Backend, Snapshot  # noqa: E402
from client.model import Event, ExportInfo, RequestInfo  # noqa: E402

APP_ID: Final = "org.qubes.BlockBrokerGtk"
TITLE: Final = "Block exports"
TICK_S: Final = 1
OUTCOME_CSS: Final = (
    b".outcome { padding: 8px 12px; border-radius: 8px; }"
    b".outcome.ok { background: alpha(@success_color, 0.15); }"
    b".outcome.failed { background: alpha(@error_color, 0.15); }"
)


def post(func: Callable[[], None]) -> None:
    """Run `func` on GTK's main loop (called from the D-Bus thread)."""

    def once() -> bool:
        func()
        return GLib.SOURCE_REMOVE  # type: ignore[no-any-return]

    GLib.idle_add(once)


def _key(path: str) -> int:
    tail = path.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 1 << 62


class Row:
    """One list row (Adw.ActionRow) with its buttons; the accessible label is the row's text."""

    def __init__(self, path: str, buttons: list[tuple[str, str, Callable[[], None]]]) -> None:
        self.path = path
        self.widget: Any = Adw.ActionRow(use_markup=False, subtitle_lines=2)
        self.buttons: list[Any] = []
        for label, css, action in buttons:
            button = Gtk.Button(label=label, valign=Gtk.Align.CENTER)
            button.add_css_class(css)
            button.connect("clicked", lambda _b, act=action: act())
            self.widget.add_suffix(button)
            self.buttons.append(button)

    def show(self, title: str, detail: str) -> None:
        self.widget.set_title(title)
        self.widget.set_subtitle(detail)
        self.widget.update_property([Gtk.AccessibleProperty.LABEL], [f"{title} · {detail}"])

    def sensitive(self, on: bool) -> None:
        for button in self.buttons:
            button.set_sensitive(on)


class Window:
    """The window: a status line, the pending requests, the exports."""

    def __init__(self, app: Any, backend: Backend, where: str) -> None:
        self.backend = backend
        self.where = where
        self.requests: dict[str, RequestInfo] = {}
        self.exports: dict[str, ExportInfo] = {}
        self.request_rows: dict[str, Row] = {}
        self.export_rows: dict[str, Row] = {}
        self.busy: set[str] = set()  # objects with a call in flight: their buttons are off

        self.win: Any = Adw.ApplicationWindow(
            application=app, title=TITLE, default_width=900, default_height=600
        )
        self.heading: Any = Adw.WindowTitle(title=TITLE, subtitle=f"connecting to {where}")
        header = Adw.HeaderBar()
        header.set_title_widget(self.heading)

        self.outcome: Any = Gtk.Label(xalign=0, wrap=True, selectable=False)
        self.outcome.set_visible(False)
        self.outcome.add_css_class("outcome")

        self.request_list = self._list("No pending requests")
        self.export_list = self._list("No exports")
        page = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=12)
        for margin in ("top", "bottom", "start", "end"):
            getattr(page, f"set_margin_{margin}")(18)
        page.append(self.outcome)
        page.append(self._heading("Pending requests"))
        page.append(self.request_list)
        page.append(self._heading("Exports"))
        page.append(self.export_list)
        clamp = Adw.Clamp(maximum_size=860, child=page)
        scrolled = Gtk.ScrolledWindow(vexpand=True, child=clamp)
        content = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        content.append(header)
        content.append(scrolled)
        self.win.set_content(content)
        self._style()
        GLib.timeout_add_seconds(TICK_S, self._tick)

    @staticmethod
    def _list(empty: str) -> Any:
        listbox = Gtk.ListBox(selection_mode=Gtk.SelectionMode.NONE)
        listbox.add_css_class("boxed-list")
        placeholder = Gtk.Label(label=empty, margin_top=12, margin_bottom=12)
        placeholder.add_css_class("dim-label")
        listbox.set_placeholder(placeholder)
        listbox.set_sort_func(lambda a, b: _key(a.get_name()) - _key(b.get_name()))
        return listbox

    @staticmethod
    def _heading(label: str) -> Any:
        heading = Gtk.Label(label=label, xalign=0, margin_top=6)
        heading.add_css_class("heading")
        return heading

    @staticmethod
    def _style() -> None:
        css = Gtk.CssProvider()
        css.load_from_data(OUTCOME_CSS)
        display = Gtk.Widget.get_display(Gtk.Label())
        Gtk.StyleContext.add_provider_for_display(
            display, css, Gtk.STYLE_PROVIDER_PRIORITY_APPLICATION
        )

    # -- what the service says ----------------------------------------------------------------

    def ready(self, snapshot: Snapshot | None, error: BlockBrokerError | None) -> None:
        if error is not None or snapshot is None:
            self.heading.set_subtitle(f"not connected to {self.where}")
            self.say(text.error_text(error or BlockBrokerError("no answer")), ok=False)
            return
        self._online(snapshot.status is not None)
        for exp in snapshot.exports.values():
            self._export(exp)
        for req in snapshot.requests.values():
            self._request(req)

    def event(self, ev: Event) -> None:
        if ev.kind in ("added", "changed") and ev.export is not None:
            self._export(ev.export)
        elif ev.kind == "removed":
            self._forget(ev.path, self.exports, self.export_rows, self.export_list)
        elif ev.kind in ("request-added", "request-changed") and ev.request is not None:
            self._request(ev.request)
        elif ev.kind == "request-removed":
            self._forget(ev.path, self.requests, self.request_rows, self.request_list)
        elif ev.kind == "service":
            self._online(bool(ev.online))

    def _online(self, online: bool) -> None:
        state = "policyd is running" if online else "policyd is not running"
        self.heading.set_subtitle(f"{self.where}: {state}")

    def _export(self, exp: ExportInfo) -> None:
        self.exports[exp.export] = exp
        row = self.export_rows.get(exp.export)
        if row is None:
            row = Row(
                exp.export, [("Detach", "destructive-action", lambda: self.detach(exp.export))]
            )
            row.widget.set_name(exp.export)
            self.export_rows[exp.export] = row
            self.export_list.append(row.widget)
        row.show(text.export_title(exp), text.export_detail(exp))
        row.sensitive(exp.export not in self.busy)

    def _request(self, req: RequestInfo) -> None:
        self.requests[req.request] = req
        row = self.request_rows.get(req.request)
        if row is None:
            row = Row(
                req.request,
                [
                    ("Deny", "destructive-action", lambda: self.deny(req.request)),
                    ("Approve", "suggested-action", lambda: self.approve(req.request)),
                ],
            )
            row.widget.set_name(req.request)
            self.request_rows[req.request] = row
            self.request_list.append(row.widget)
        row.show(text.request_title(req), text.request_detail(req))
        row.sensitive(req.state == "pending" and req.request not in self.busy)

    @staticmethod
    def _forget(path: str, known: dict[str, Any], rows: dict[str, Row], listbox: Any) -> None:
        known.pop(path, None)
        row = rows.pop(path, None)
        if row is not None:
            listbox.remove(row.widget)

    def _tick(self) -> bool:
        for path, req in self.requests.items():
            if req.state == "pending" and path in self.request_rows:
                self.request_rows[path].show(text.request_title(req), text.request_detail(req))
        return GLib.SOURCE_CONTINUE  # type: ignore[no-any-return]

    # -- what the person does -----------------------------------------------------------------

    def approve(self, path: str) -> None:
        req = self.requests.get(path)
        if req is not None:
            what = f"request {req.id} ({text.request_title(req)})"
            self._call(path, f"Approving {what}", f"Approved {what}", self.backend.approve, req)

    def deny(self, path: str) -> None:
        req = self.requests.get(path)
        if req is not None:
            what = f"request {req.id} ({text.request_title(req)})"
            self._call(path, f"Denying {what}", f"Denied {what}", self.backend.deny, req)

    def detach(self, path: str) -> None:
        exp = self.exports.get(path)
        if exp is not None:
            what = f"export {exp.id} ({text.export_title(exp)})"
            self._call(path, f"Detaching {what}", f"Detached {what}", self.backend.detach, exp)

    def _call(self, path: str, doing: str, done_text: str, call: Any, obj: Any) -> None:
        self.busy.add(path)
        self._refresh(path)
        self.say(f"{doing}: polkit may ask you to authenticate", ok=None)

        def done(_result: None, error: BlockBrokerError | None) -> None:
            self.busy.discard(path)
            self._refresh(path)
            if error is None:
                self.say(done_text, ok=True)
            else:
                self.say(f"{doing.split(' ', 1)[0]} failed: {text.error_text(error)}", ok=False)

        call(obj, done)

    def _refresh(self, path: str) -> None:
        if path in self.requests:
            self._request(self.requests[path])
        elif path in self.exports:
            self._export(self.exports[path])

    def say(self, message: str, ok: bool | None) -> None:
        """The outcome of the last action (or an error), until the next one."""
        self.outcome.set_label(message)
        for css, on in (("ok", ok is True), ("failed", ok is False)):
            (self.outcome.add_css_class if on else self.outcome.remove_css_class)(css)
        self.outcome.set_visible(True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blockbroker-gtk",
        description="Exports and pending export requests of blockbroker, on a desktop.",
    )
    parser.add_argument(
        "--address",
        help="D-Bus address of the system bus (default: $DBUS_SYSTEM_BUS_ADDRESS, else the "
        "system bus)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    env_address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    where = args.address or ("$DBUS_SYSTEM_BUS_ADDRESS" if env_address else "the system bus")
    app = Adw.Application(application_id=APP_ID, flags=Gio.ApplicationFlags.NON_UNIQUE)
    # The desktop file and the icon (desktop/ in the source, hicolor in the package) are named
    # after the application id, so shells match the window to them.
    Gtk.Window.set_default_icon_name(APP_ID)
    backend = Backend(post, args.address)
    windows: list[Window] = []

    def activate(_app: Any) -> None:
        if windows:
            windows[0].win.present()
            return
        window = Window(app, backend, where)
        windows.append(window)
        window.win.present()
        backend.start(window.event, window.ready)

    app.connect("activate", activate)
    app.connect("shutdown", lambda _app: backend.stop())
    status: int = app.run([sys.argv[0] if sys.argv else "blockbroker-gtk"])
    return status
