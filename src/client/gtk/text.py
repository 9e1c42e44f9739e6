"""What the desktop tool's rows say: exports and requests as text for a person.

Runs in the calling user's process; no I/O, no gi (unit-tested without a display). A request's
device name and description are the VM's claim: they are shown only through
`client.model.printable` (printable ASCII, bounded) and marked as claimed, so a VM cannot fake
the text around them (no newlines, bidi or zero-width characters reach the window). GTK labels
get plain text, never markup.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Final

from client.errors import BlockBrokerError
from client.model import ExportInfo, RequestInfo, diskseq_text, printable

_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
STATES: Final = {
    "waiting-for-blkback": "waiting for blkback",
    "connected": "connected",
    "no-blkback": "no blkback",
    "backend-in-vm": "blkback in the source VM",
}


def size_text(size: int) -> str:
    """'512 bytes', '7.5 GiB'; 0 (the VM did not say): 'size unknown'."""
    if size <= 0:
        return "size unknown"
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    index = 0
    while value >= 1024 and index < len(_UNITS) - 1:
        value /= 1024
        index += 1
    return f"{value:.1f} {_UNITS[index]}"


def time_left(expires_us: int, now: float | None = None) -> str:
    """'4:59 left', 'expired'; 0 (no expiry given): 'no time limit'."""
    if expires_us <= 0:
        return "no time limit"
    left = int(expires_us / 1e6 - (time.time() if now is None else now))
    if left <= 0:
        return "expired"
    minutes, seconds = divmod(left, 60)
    return f"{minutes}:{seconds:02d} left"


def since_text(since_us: int) -> str:
    """Local wall-clock time of a unix-µs timestamp: 'since 14:03:07'."""
    if since_us <= 0:
        return "since unknown"
    return "since " + datetime.fromtimestamp(since_us / 1e6).strftime("%H:%M:%S")


def mode_text(mode: str) -> str:
    return {"r": "read-only", "w": "read-write"}.get(mode, f"mode {printable(mode, 8)}")


def request_title(req: RequestInfo) -> str:
    return (
        f"{printable(req.source, 32)} asks to give its device "
        f"'{printable(req.device_name, 32)}' to {printable(req.target, 32)}"
    )


def request_detail(req: RequestInfo, now: float | None = None) -> str:
    parts = [
        f"claimed: '{printable(req.description)}'" if req.description else "no description",
        size_text(req.size),
        mode_text(req.mode),
        f"diskseq {diskseq_text(req.diskseq)}",
        f"request {req.id}",
    ]
    parts.append(time_left(req.expires, now) if req.state == "pending" else req.state)
    return " · ".join(parts)


def export_title(exp: ExportInfo) -> str:
    return f"{printable(exp.source, 96)} → {printable(exp.frontend_domain, 32)}"


def export_detail(exp: ExportInfo) -> str:
    return " · ".join(
        [
            f"from {printable(exp.backend_domain, 32) or 'dom0'}",
            mode_text(exp.mode),
            f"diskseq {diskseq_text(exp.diskseq)}",
            STATES.get(exp.state, printable(exp.state, 32) or "state unknown"),
            since_text(exp.since),
            f"export {exp.id}",
        ]
    )


def error_text(error: BlockBrokerError) -> str:
    """The error under the API's name for it ('DeviceChanged: ...'), else its D-Bus name."""
    name = type(error).name or error.dbus_name or type(error).__name__
    return f"{name}: {error.message}" if error.message else name
