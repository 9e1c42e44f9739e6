"""The polkit details of each check that concerns one object: what the person is asked about.

Unprivileged policyd code. The actions' messages (policy/org.qubes.blockbroker.policy) show
these values through polkit's $(name) expansion, and polkit rules read them (action.lookup).
Every value is policyd's own: validated grammars (domain names, a VM's device name, numbers),
policyd's objects and its own view of sizes; text policyd did not make itself (a VM's device
description, a caller's path, an export's source) goes through policyd.claims.shown. polkit
reads a few details itself (polkit.message, polkit.icon_name...): no key here starts with
"polkit.".
"""

from __future__ import annotations

from policyd import claims, modes
from policyd.exports.registry import ExportRecord
from policyd.requests.model import PendingRequest

PATH_SHOWN = 128  # a path's characters in a prompt: long enough for most, still one line


def request(req: PendingRequest) -> dict[str, str]:
    """Approve, Deny, Withdraw. device, source, target, diskseq, mode: also for rules."""
    return {
        "request": req.object_path,
        "source": req.source,
        "target": req.target,
        "device": req.device.name,  # DEVICE_NAME_RE: [a-z][a-z0-9]{0,15}
        "diskseq": f"{req.device.diskseq:#x}",  # 0x2a: as the CLI and blockbroker-gtk show it
        "mode": req.policy_mode,
        "access": modes.in_words(req.mode),
        # the VM's claims about its device
        "description": claims.shown(req.device.description),
        "size": claims.size_text(req.device.size),
    }


def export(path_shown: str, size: int | None, target: str, read_only: bool) -> dict[str, str]:
    """Export and ExportFd: what is exported (already through claims.shown), its size as
    policyd sees it, to which VM, how."""
    mode = modes.from_read_only(read_only)
    return {
        "path": path_shown,
        "size": claims.size_text(size),
        "target": target,
        "mode": modes.policy_mode(mode),
        "access": modes.in_words(mode),
    }


def detach(record: ExportRecord) -> dict[str, str]:
    """DetachExport and Export.Detach: the export, what it exports, and to which VM."""
    return {
        "export": record.object_path,
        "source": claims.shown(record.source, PATH_SHOWN),
        "backend": record.backend_domain,
        "target": record.frontend_domain,
        "mode": modes.policy_mode(record.mode),
        "access": modes.in_words(record.mode),
    }
