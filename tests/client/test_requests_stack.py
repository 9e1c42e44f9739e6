"""`blockbroker requests|approve|deny` and the API's request calls against the real stack.

Runs as root with real daemons, including polkitd: the approver is a non-root uid (polkit
authorizes uid 0 always). The request itself is made as root, the way the qrexec bridge's
privileged path would, over a connection held open for the test (a request belongs to it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Variant
from harness.stack import Stack, StackConfig
from vbd import cli, cli_json

from client.model import MANAGER_IFACE, MANAGER_PATH
from client.sync import Client

pytestmark = [pytest.mark.root, pytest.mark.daemon]

NOBODY = 65534  # the polkit rule below says yes for nobody
DAEMON = 1  # ... and no for daemon
SYS_USB = 5
WORK = 1

RULES = """
polkit.addRule(function(action, subject) {
    if (action.id == "org.qubes.blockbroker.approve") {
        if (subject.user == "nobody") return polkit.Result.YES;
        if (subject.user == "daemon") return polkit.Result.NO;
    }
});
"""
POLICY = """# tests/client: requests from sys-usb to work wait for a person
request-export  loop*   sys-usb   work       ask
export          *       dom0      @anyvm     allow  mode=rw
attach          *       dom0      @anyvm     allow  mode=rw
*               *       *         *          deny
"""


@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    rules = tmp_path_factory.mktemp("polkit-rules")
    (rules / "50-client-test.rules").write_text(RULES)
    policy = tmp_path_factory.mktemp("policy")
    (policy / "50-client-test.policy").write_text(POLICY)
    return StackConfig(
        domains={"work": WORK, "sys-usb": SYS_USB},
        polkit_rules=rules,
        policy_dir=policy,
        policyd_args=["--request-expiry", "300"],
    )


@pytest.fixture
def requester(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", stack.bus_address)
    with Client() as bb:
        yield bb


def request_export(bb: Client, name: str, diskseq: int) -> str:
    """RequestExport as root for sys-usb's published device `name` (7:0, `diskseq`)."""
    stack_device: dict[str, Variant] = {
        "name": Variant("s", name),
        "major": Variant("u", 7),
        "minor": Variant("u", 0),
        "diskseq": Variant("t", diskseq),
        "size": Variant("t", 1 << 20),
        "read-only": Variant("b", False),
        "description": Variant("s", "usb stick"),
    }
    body: list[Any] = ["sys-usb", stack_device, "work", {}]
    (path,) = bb._run(
        bb._async._call(MANAGER_PATH, MANAGER_IFACE, "RequestExport", "sa{sv}sa{sv}", body)
    )
    return str(path)


def publish(stack: Stack, name: str, diskseq: int) -> None:
    """What the VM-side helper writes in the VM's own XenStore dir."""
    base = f"/local/domain/{SYS_USB}/data/blockbroker/{name}"
    stack.xs_write(f"{base}/dev", "7:0")
    stack.xs_write(f"{base}/diskseq", str(diskseq))


def remove_written_vbd(stack: Stack, backend: str) -> None:
    frontend = stack.xs_read(f"{backend}/frontend")
    stack.xs_rm(backend)
    if frontend:
        stack.xs_rm(frontend)


def test_requests_list_and_approve(stack: Stack, requester: Client) -> None:
    publish(stack, "loop9", 4242)
    path = request_export(requester, "loop9", 4242)
    result = cli(stack, "requests", "--json")
    assert result.returncode == 0, result.stderr
    (listed,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert listed["request"] == path
    assert (listed["source"], listed["target"], listed["device_name"]) == (
        "sys-usb",
        "work",
        "loop9",
    )
    assert (listed["diskseq"], listed["state"]) == (4242, "pending")

    human = cli(stack, "requests")
    assert "usb stick" in human.stdout
    assert "pending" in human.stdout

    refused = cli(stack, "approve", listed["id"], user=DAEMON)
    assert refused.returncode == 4, refused.stderr
    assert "AccessDenied" in refused.stderr

    approved = cli(stack, "approve", listed["id"], user=NOBODY)
    assert approved.returncode == 0, approved.stderr
    remaining = {r.request: r.state for r in requester.list_requests()}
    assert remaining.get(path, "approved") in ("approving", "approved")  # decided; then removed
    backends = stack.xs_ls(f"/local/domain/{SYS_USB}/backend/vbd/{WORK}")
    assert len(backends) == 1
    backend = f"/local/domain/{SYS_USB}/backend/vbd/{WORK}/{backends[0]}"
    vm_exports = [e for e in cli_json(stack, "list") if e["backend_path"] == backend]
    try:
        assert stack.xs_read(f"{backend}/physical-device") == "7:0"
        assert stack.xs_read(f"{backend}/diskseq") == f"{4242:x}"
        # the approved request became an Export (SourceKind vm), detachable like any other
        (export,) = vm_exports
        assert (export["source_kind"], export["diskseq"]) == ("vm", 4242)
        assert (export["backend_domid"], export["frontend_domain"]) == (SYS_USB, "work")
        detached = cli(stack, "detach", export["id"])
        assert detached.returncode == 0, detached.stderr
        assert not stack.xs_exists(backend)
    finally:
        if stack.xs_exists(backend):
            remove_written_vbd(stack, backend)

    again = cli(stack, "approve", listed["id"], user=NOBODY)
    assert again.returncode == 1  # decided and gone
    assert "org." in again.stderr


def test_deny(stack: Stack, requester: Client) -> None:
    publish(stack, "loop8", 4343)
    path = request_export(requester, "loop8", 4343)
    assert path in {r.request for r in requester.list_requests()}
    denied = cli(stack, "deny", path, user=NOBODY)
    assert denied.returncode == 0, denied.stderr
    assert not stack.xs_exists(f"/local/domain/{SYS_USB}/backend/vbd/{WORK}") or not stack.xs_ls(
        f"/local/domain/{SYS_USB}/backend/vbd/{WORK}"
    )


def test_request_usage_errors(stack: Stack) -> None:
    for args in (["approve", "x"], ["deny", "/org/qubes/BlockBroker1/export/1"]):
        assert cli(stack, *args).returncode == 2
