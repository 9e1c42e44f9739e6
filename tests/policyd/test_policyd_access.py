"""Authorization: every mutating method refuses an unprivileged caller (a real uid-65534 client
process on the stack's bus), with the service's own AccessDenied; read-only access works.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from harness.names import (
    EXPORT_IFACE,
    INTROSPECTABLE_IFACE,
    MANAGER_IFACE,
    OM_IFACE,
    PROPS_IFACE,
    REQUEST_IFACE,
)
from harness.rawbus import calls_as, child_call
from harness.stack import Stack
from policydlab import NOBODY, Api, assert_clean, run_as

from policyd.bus.service import METHODS, ROUTES, StartupError, check_table

pytestmark = [pytest.mark.root, pytest.mark.daemon]

BE = "/local/domain/0/backend/vbd/1/51712"
REQUEST = "/org/qubes/BlockBroker1/request/1"
DBUS_NULL = ("/dev/null",)  # the fd an ExportFd call passes


def calls(export: str) -> dict[str, list[object]]:
    """One call of each method (mutating ones and a few reads), keyed like authz's table."""
    return {
        "Manager.Attach": child_call("Attach", "s", [BE]),
        "Manager.Detach": child_call("Detach", "s", [BE]),
        "Manager.Export": child_call("Export", "ssa{sv}", ["/etc/passwd", "work", {}]),
        "Manager.ExportFd": child_call("ExportFd", "hsa{sv}", [0, "work", {}], fd_paths=DBUS_NULL),
        "Manager.DetachExport": child_call("DetachExport", "o", [export]),
        "Export.Detach": child_call("Detach", path=export, iface=EXPORT_IFACE),
        "Manager.RequestExport": child_call(
            "RequestExport", "sa{sv}sa{sv}", ["work", {}, "untrusted", {}]
        ),
        "Request.Approve": child_call("Approve", path=REQUEST, iface=REQUEST_IFACE),
        "Request.Deny": child_call("Deny", path=REQUEST, iface=REQUEST_IFACE),
        "Request.Withdraw": child_call("Withdraw", path=REQUEST, iface=REQUEST_IFACE),
        "read.GetAll": child_call("GetAll", "s", [MANAGER_IFACE], iface=PROPS_IFACE),
        "read.GetManagedObjects": child_call("GetManagedObjects", iface=OM_IFACE),
        "read.Introspect": child_call("Introspect", iface=INTROSPECTABLE_IFACE),
    }


def run_calls_as(uid: int, address: str, export: str) -> dict[str, object]:
    """Every call of calls() on one connection as `uid`: {"uid": its uid, key: error or "ok"}."""
    table = calls(export)
    child_uid, outcomes = calls_as(address, list(table.values()), user=uid, short=False)
    result: dict[str, object] = {"uid": child_uid}
    for key, out in zip(table, outcomes, strict=True):
        result[key] = out["error"] or "ok"
    return result


def test_every_mutating_method_is_denied_to_an_unprivileged_caller(stack: Stack, api: Api) -> None:
    image = stack.make_image("access.img")
    export = api.export(image)  # a real object, so Export.Detach reaches the check
    result = run_calls_as(NOBODY, stack.bus_address, export)
    assert result.pop("uid") == NOBODY
    denied = "org.qubes.BlockBroker1.Error.AccessDenied"
    mutating = {f"{i.rsplit('.', 1)[1]}.{m}" for i, m in ROUTES}
    assert {k for k in result if not k.startswith("read.")} == mutating
    for key, outcome in result.items():
        assert outcome == ("ok" if key.startswith("read.") else denied), key
    assert api.managed()[export]["Source"] == str(image)  # untouched
    api.detach(export)
    assert_clean(stack, image)


def test_the_bus_refuses_to_let_anyone_else_own_the_name(stack: Stack) -> None:
    script = r"""
import asyncio, json, os
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_address=os.environ["DBUS_ADDRESS"]).connect()
    try:
        await bus.request_name("org.qubes.BlockBroker1")
        print(json.dumps("owned"))
    except Exception as e:
        print(json.dumps(type(e).__name__ + ": " + str(e)))
asyncio.run(main())
"""
    outcome = run_as(NOBODY, stack.bus_address, script)
    assert "not allowed to own" in outcome
    assert os.getuid() == 0


def test_every_declared_method_has_a_polkit_action() -> None:
    for iface, member, action in ((m.interface, m.name, m.action) for m in METHODS):
        assert iface.startswith("org.qubes.BlockBroker1.") and member
        assert action.startswith("org.qubes.blockbroker.")
    with pytest.raises(StartupError, match="without a polkit action"):
        check_table({*ROUTES, ("org.qubes.BlockBroker1.Manager", "New")})
    with pytest.raises(StartupError, match="do not exist"):
        check_table(set(list(ROUTES)[1:]))
    check_table(set(ROUTES))


def test_policyd_runs_unprivileged(stack: Stack) -> None:
    text = Path(f"/proc/{stack.daemons['policyd'].pid}/status").read_text()
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    uid = pwd.getpwnam("blockbroker").pw_uid
    assert status["Uid"].split() == [str(uid)] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
