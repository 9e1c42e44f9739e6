"""Helpers for the export-request tests: callers as other uids, a VM's loop device, the bridge.

Test code, runs as root against the host stack (tests/harness): real oxenstored, the project's
bus policy on a private dbus-daemon, real polkitd, the broker and policyd as user blockbroker.
A "VM" here is a domain registered in XenStore (sys-usb = 5); its device is a real loop device
on the host, which the VM-side helper describes from the host's real sysfs.
"""

from __future__ import annotations

import contextlib
import grp
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from harness import loops
from harness.names import EXPORT_IFACE, MANAGER, OM_IFACE, REQUEST_IFACE
from harness.rawbus import HeldCall, as_user, call_as, child_call
from harness.stack import Stack

VENV_BIN = Path(sys.executable).parent
BRIDGE_GROUP = "blockbroker-qrexec"
NOBODY = 65534  # the approver: the polkit rules say yes for user nobody
REFUSED_USER = "daemon"  # a polkit rule says no
UNRULED_USER = "bin"  # no rule: the action's default, auth_admin, and no agent to ask
SYS_USB = ("sys-usb", 5)
WORK = ("work", 1)
UNTRUSTED = ("untrusted", 2)
XVDB = 51728
WAIT_S = 30.0
T = TypeVar("T")


def bridge_gid() -> int:
    return grp.getgrnam(BRIDGE_GROUP).gr_gid


def call(stack: Stack, member: str, sig: str = "", body: list[Any] | None = None,
         **kw: Any) -> dict[str, Any]:  # fmt: skip
    """One call in a child process (as `user`, else root; rawbus.call_as's keywords: path,
    iface, user, groups); {"error": short name or full, ...}."""
    return call_as(stack.bus_address, member, sig, body, **kw)


class Holder(HeldCall):
    """A requester that stays connected (like the bridge waiting for a decision), running as
    `user` with `groups`; `send("Withdraw")` calls a method on its request with its connection."""

    def __init__(self, stack: Stack, body: list[Any], user: int | str | None = None,
                 groups: tuple[int, ...] = ()) -> None:  # fmt: skip
        request = child_call("RequestExport", "sa{sv}sa{sv}", body)
        super().__init__(stack.bus_address, request, REQUEST_IFACE, user, groups)


def managed_exports(stack: Stack) -> dict[str, dict[str, Any]]:
    objects = call(stack, "GetManagedObjects", path=MANAGER, iface=OM_IFACE)["body"][0]
    return {p: i[EXPORT_IFACE] for p, i in objects.items() if EXPORT_IFACE in i}


def detach_export(stack: Stack, export: str) -> None:
    out = call(stack, "Detach", path=export, iface=EXPORT_IFACE)
    assert out["error"] is None, out


def managed_requests(stack: Stack) -> dict[str, dict[str, Any]]:
    objects = call(stack, "GetManagedObjects", path=MANAGER, iface=OM_IFACE)["body"][0]
    return {p: i[REQUEST_IFACE] for p, i in objects.items() if REQUEST_IFACE in i}


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll until `probe` returns something; a bounded wait for an event, not a timing test."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def wait_request(stack: Stack, device: str) -> tuple[str, dict[str, Any]]:
    def probe() -> tuple[str, dict[str, Any]] | None:
        for path, props in managed_requests(stack).items():
            if props["DeviceName"] == device and props["State"] == "pending":
                return path, props
        return None

    return wait_for(probe, f"a pending request for {device}")


def device_descriptor(name: str, diskseq: int, major: int = 7, minor: int = 0) -> dict[str, Any]:
    return {
        "name": ["s", name],
        "major": ["u", major],
        "minor": ["u", minor],
        "diskseq": ["t", diskseq],
        "size": ["t", 1 << 20],
        "read-only": ["b", False],
        "description": ["s", "test disk"],
    }


@contextlib.contextmanager
def vm_loop(directory: Path, name: str = "vm-disk.img") -> Iterator[Path]:
    """A real loop device over a file of ours (the VM's device); detached afterwards."""
    backing = directory / name
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(dev)
    finally:
        loops.detach_all(backing)


def sysfs(dev: Path, attr: str) -> str:
    return loops.sysfs(dev.name, attr)


def publish(stack: Stack, domid: int, name: str, dev: str, diskseq: str) -> None:
    """What the VM's helper (or its udev hook) writes in its own XenStore dir."""
    base = f"/local/domain/{domid}/data/blockbroker/{name}"
    stack.xs_write(f"{base}/dev", dev)
    stack.xs_write(f"{base}/diskseq", diskseq)


def vm_backends(stack: Stack, domid: int) -> list[str]:
    """Every vbd backend dir in a VM's backend tree (what approvals write)."""
    base = f"/local/domain/{domid}/backend/vbd"
    if not stack.xs_exists(base):
        return []
    return [f"{base}/{fe}/{d}" for fe in stack.xs_ls(base) for d in stack.xs_ls(f"{base}/{fe}")]


def frontends(stack: Stack, domid: int) -> list[str]:
    base = f"/local/domain/{domid}/device/vbd"
    return [f"{base}/{d}" for d in stack.xs_ls(base)] if stack.xs_exists(base) else []


def remove_vbd(stack: Stack, backend: str) -> None:
    frontend = stack.xs_read(f"{backend}/frontend")
    stack.xs_rm(backend)
    if frontend:
        stack.xs_rm(frontend)


def bridge_argv() -> list[str]:
    """The bridge as qrexec would run it: a non-root uid with group blockbroker-qrexec."""
    return [*as_user(NOBODY, (bridge_gid(),)), str(VENV_BIN / "blockbroker-qrexec-bridge")]


def run_bridge(
    stack: Stack, line: bytes, source: str | None = "sys-usb", target: str | None = "work"
) -> subprocess.CompletedProcess[str]:
    env = stack.env()
    env.pop("QREXEC_REMOTE_DOMAIN", None)
    env.pop("QREXEC_SERVICE_ARGUMENT", None)
    if source is not None:
        env["QREXEC_REMOTE_DOMAIN"] = source
    if target is not None:
        env["QREXEC_SERVICE_ARGUMENT"] = target
    result = subprocess.run(bridge_argv(), input=line, env=env, capture_output=True, check=False,
                            timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def helper_argv(dev: Path, target: str, source: str = "sys-usb", domid: int = 5,
                *extra: str) -> list[str]:  # fmt: skip
    """The VM-side helper, talking to the bridge directly (no qrexec on this host)."""
    return [
        str(VENV_BIN / "blockbroker"), "request-export", dev.name, "--to", target,
        "--bridge-command", " ".join(bridge_argv()), "--as-domain", source,
        "--xenstore-prefix", f"/local/domain/{domid}/", *extra,
    ]  # fmt: skip


def start_helper(stack: Stack, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=stack.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.strip(), err


def audit_lines(stack: Stack) -> list[str]:
    return [line for line in stack.log_path("policyd").read_text().splitlines()
            if "event=audit" in line]  # fmt: skip


def policyd_lines(stack: Stack) -> int:
    """policyd's log lines about calls (audit decisions, refusals, requests): a call that never
    reached policyd adds none. (Start-up lines may still arrive: they are not counted.)"""
    words = ("event=audit", "call refused", "call failed", "request")
    text = stack.log_path("policyd").read_text()
    return sum(any(w in line for w in words) for line in text.splitlines())


def env_without(keys: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in keys}
