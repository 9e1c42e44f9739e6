"""How the `blockbroker` CLI prints results: a table for people, JSON lines for programs.

Runs as the calling user; pure formatting, no I/O beyond the stream it is given.
`--json` prints one JSON object per result on its own line (an export, the status, an event),
with the snake_case of every D-Bus property plus `export` (object path) and `id`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from client.model import Event, ExportInfo, RequestInfo, Status, diskseq_text, printable

EXPORT_COLUMNS = (
    "ID",
    "FRONTEND",
    "DEVID",
    "MODE",
    "STATE",
    "LOOP",
    "MAJ:MIN",
    "DISKSEQ",
    "SOURCE",
)


REQUEST_COLUMNS = (
    "ID", "STATE", "SOURCE", "TARGET", "DEVICE", "MAJ:MIN", "DISKSEQ", "SIZE", "MODE", "EXPIRES",
    "DESCRIPTION (from the VM)",
)  # fmt: skip


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def export_row(info: ExportInfo) -> tuple[str, ...]:
    frontend = info.frontend_domain or str(info.frontend_domid)
    return (
        info.id,
        frontend,
        str(info.devid),
        info.mode,
        info.state,
        info.loop_device or "-",
        f"{info.major}:{info.minor}",
        diskseq_text(info.diskseq),
        info.source,
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_exports(exports: Sequence[ExportInfo], as_json: bool, out: TextIO) -> None:
    if as_json:
        for info in exports:
            print(json_line(info.to_json()), file=out)
    elif exports:
        print(table(EXPORT_COLUMNS, [export_row(e) for e in exports]), file=out)
    else:
        print("no exports", file=out)


def print_export_detail(info: ExportInfo, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json_line(info.to_json()), file=out)
        return
    since = (
        datetime.fromtimestamp(info.since / 1e6, UTC).isoformat(timespec="seconds")
        if info.since
        else "-"
    )
    rows = [
        ("export", info.export),
        ("source", f"{info.source} ({info.source_kind})" if info.source_kind else info.source),
        ("frontend", f"{info.frontend_domain} (domid {info.frontend_domid})"),
        ("backend", f"{info.backend_domain} (domid {info.backend_domid})"),
        ("devid", str(info.devid)),
        ("backend_path", info.backend_path),
        ("loop_device", info.loop_device or "-"),
        ("major:minor", f"{info.major}:{info.minor}"),
        ("diskseq", diskseq_text(info.diskseq)),
        *([("dm_name", info.dm_name), ("dm_uuid", info.dm_uuid)] if info.dm_name else []),
        ("mode", info.mode),
        ("state", info.state),
        ("since", since),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}", file=out)


def _utc(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%H:%M:%SZ") if us else "-"


def request_row(req: RequestInfo) -> tuple[str, ...]:
    return (
        req.id,
        req.state,
        printable(req.source),
        printable(req.target),
        printable(req.device_name, 16),
        f"{req.major}:{req.minor}",
        diskseq_text(req.diskseq),
        str(req.size),
        req.mode,
        _utc(req.expires),
        printable(req.description),
    )


def print_requests(requests: Sequence[RequestInfo], as_json: bool, out: TextIO) -> None:
    """JSON keeps the VM's text as sent (JSON escapes it); the table shows it printable-only."""
    if as_json:
        for req in requests:
            print(json_line(req.to_json()), file=out)
    elif requests:
        print(table(REQUEST_COLUMNS, [request_row(r) for r in requests]), file=out)
    else:
        print("no export requests", file=out)


def print_status(status: Status, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json_line(status.to_json()), file=out)
        return
    print(f"version             {status.version}", file=out)
    print(f"exports             {status.export_count}", file=out)
    print(f"broker connected    {'yes' if status.broker_connected else 'NO'}", file=out)
    print(f"xenstore connected  {'yes' if status.xenstore_connected else 'NO'}", file=out)


def event_json(event: Event) -> dict[str, Any]:
    obj: dict[str, Any] = {"event": event.kind}
    if event.path:
        obj["path"] = event.path
    if event.export is not None:
        obj.update(event.export.to_json())
    if event.status is not None:
        obj["status"] = event.status.to_json()
    if event.changed:
        obj["changed"] = sorted(event.changed)
    if event.online is not None:
        obj["online"] = event.online
    if event.request is not None:
        obj.update(event.request.to_json())
    return obj


def print_event(event: Event, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json_line(event_json(event)), file=out, flush=True)
        return
    if event.kind == "service":
        text = "service " + ("appeared" if event.online else "vanished")
    elif event.kind == "status" and event.status is not None:
        text = f"status exports={event.status.export_count}"
        text += f" broker={event.status.broker_connected}"
        text += f" xenstore={event.status.xenstore_connected}"
    elif event.request is not None:
        r = event.request
        text = f"{event.kind} {r.id} {r.state} {printable(r.source)} -> {printable(r.target)}"
        text += (
            f" {printable(r.device_name, 16)} {r.major}:{r.minor} diskseq={diskseq_text(r.diskseq)}"
        )
    elif event.export is not None:
        e = event.export
        text = f"{event.kind} {e.id} {e.state} {e.loop_device} {e.major}:{e.minor}"
        text += f" diskseq={diskseq_text(e.diskseq)} -> {e.frontend_domain}"
        if event.changed:
            text += " (" + ",".join(sorted(event.changed)) + ")"
    else:
        text = f"{event.kind} {event.path}"
    print(text, file=out, flush=True)
