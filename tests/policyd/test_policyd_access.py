"""Authorization: every mutating method refuses an unprivileged caller (a real uid-65534 client
process on the stack's bus), with the service's own AccessDenied; read-only access works.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from harness.stack import Stack
from policydlab import NOBODY, Api, assert_clean, run_as

from policyd.bus.service import METHODS, ROUTES, StartupError, check_table

pytestmark = [pytest.mark.root, pytest.mark.daemon]

CLIENT = r"""
import asyncio, json, os
from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

EXPORT = os.environ.get("EXPORT", "/org/qubes/BlockBroker1/export/1")
M = ("/org/qubes/BlockBroker1", "org.qubes.BlockBroker1.Manager")
REQUEST = "/org/qubes/BlockBroker1/request/1"
CALLS = {
    "Manager.Attach": (*M, "Attach", "s", ["/local/domain/0/backend/vbd/1/51712"]),
    "Manager.Detach": (*M, "Detach", "s", ["/local/domain/0/backend/vbd/1/51712"]),
    "Manager.Export": (*M, "Export", "ssa{sv}", ["/etc/passwd", "work", {}]),
    "Manager.ExportFd": (*M, "ExportFd", "hsa{sv}", [0, "work", {}]),
    "Manager.DetachExport": (*M, "DetachExport", "o", [EXPORT]),
    "Export.Detach": (EXPORT, "org.qubes.BlockBroker1.Export", "Detach", "", []),
    "Manager.RequestExport": (*M, "RequestExport", "sa{sv}sa{sv}", ["work", {}, "untrusted", {}]),
    "Request.Approve": (REQUEST, "org.qubes.BlockBroker1.Request", "Approve", "", []),
    "Request.Deny": (REQUEST, "org.qubes.BlockBroker1.Request", "Deny", "", []),
    "Request.Withdraw": (REQUEST, "org.qubes.BlockBroker1.Request", "Withdraw", "", []),
    "read.GetAll": (*M[:1], "org.freedesktop.DBus.Properties", "GetAll", "s", [M[1]]),
    "read.GetManagedObjects": (*M[:1], "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects", "", []),
    "read.Introspect": (*M[:1], "org.freedesktop.DBus.Introspectable", "Introspect", "", []),
}

async def main():
    bus = await MessageBus(bus_address=os.environ["DBUS_ADDRESS"], negotiate_unix_fd=True).connect()
    out = {"uid": os.getuid()}
    for key, (path, iface, member, sig, body) in CALLS.items():
        fds = [os.open("/dev/null", os.O_RDONLY)] if "h" in sig else []
        reply = await bus.call(Message(destination="org.qubes.BlockBroker1", path=path,
            interface=iface, member=member, signature=sig, body=body, unix_fds=fds))
        out[key] = reply.error_name or "ok"
    print(json.dumps(out))

asyncio.run(main())
"""


def test_every_mutating_method_is_denied_to_an_unprivileged_caller(stack: Stack, api: Api) -> None:
    image = stack.make_image("access.img")
    export = api.export(image)  # a real object, so Export.Detach reaches the check
    script = CLIENT.replace(
        'os.environ.get("EXPORT", "/org/qubes/BlockBroker1/export/1")', repr(export)
    )
    result = run_as(NOBODY, stack.bus_address, script)
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
