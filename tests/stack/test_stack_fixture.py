"""The pytest fixtures other test lanes use: XenStore helpers, the bus policy, the broker.

Test harness tests, run as root against real oxenstored, dbus-daemon, broker and polkitd.
"""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.names import BUS_NAME
from harness.stack import POLKIT_BUS_NAME, SERVICE_USER, Stack, StackConfig

pytestmark = [pytest.mark.root, pytest.mark.daemon]

NOBODY = 65534


@pytest.fixture(scope="module")
def stack_config() -> StackConfig:
    return StackConfig(domains={"work": 1, "untrusted": 2}, policyd=False)


def request_name(stack: Stack, name: str, *setpriv: str) -> subprocess.CompletedProcess[str]:
    """RequestName from a dbus-send connection running under `setpriv` options."""
    return subprocess.run(
        [
            "setpriv",
            *setpriv,
            "--clear-groups",
            "dbus-send",
            f"--bus={stack.bus_address}",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            f"string:{name}",
            "uint32:0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_domains_are_registered_like_a_toolstack_does(stack: Stack) -> None:
    assert stack.domains == {"Domain-0": 0, "work": 1, "untrusted": 2}
    assert stack.xs_read("/local/domain/0/name") == "Domain-0"
    assert stack.xs_read("/local/domain/1/name") == "work"
    assert stack.xs_read("/local/domain/2/domid") == "2"
    assert stack.xs_perms("/local/domain/1") == ["n0", "r1"]
    assert stack.xs_perms("/local/domain/1/device") == ["n0", "r1"]
    assert stack.xs_perms("/local/domain/2/data") == ["n2"]
    assert stack.xs_perms("/local/domain/0/backend/vbd") == ["n0"]
    vm = stack.xs_read("/local/domain/1/vm")
    assert vm is not None and stack.xs_read(f"{vm}/name") == "work"


def test_xs_helpers_round_trip(stack: Stack) -> None:
    stack.xs_write("/local/domain/0/backend/vbd/1/51712/params", "/tmp/x.img")
    stack.xs_set_perms("/local/domain/0/backend/vbd/1", ["n0", "r1"])
    assert stack.xs_read("/local/domain/0/backend/vbd/1/51712/params") == "/tmp/x.img"
    assert stack.xs_ls("/local/domain/0/backend/vbd/1") == ["51712"]
    assert stack.xs_perms("/local/domain/0/backend/vbd/1") == ["n0", "r1"]
    stack.xs_rm("/local/domain/0/backend/vbd/1")
    assert stack.xs_read("/local/domain/0/backend/vbd/1/51712/params") is None


def test_env_reaches_the_stack(stack: Stack) -> None:
    result = subprocess.run(
        ["xenstore-read", "/local/domain/2/name"],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "untrusted"
    env = stack.env()
    assert env["BLOCKBROKER_IMAGE_DIR"] == str(stack.image_dir)
    assert env["DBUS_SYSTEM_BUS_ADDRESS"] == stack.bus_address


def test_xenstore_socket_is_reachable_by_the_service_user(stack: Stack) -> None:
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={SERVICE_USER}",
            f"--regid={SERVICE_USER}",
            "--clear-groups",
            "xenstore-read",
            "/local/domain/1/name",
        ],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "work"), result.stderr


def test_broker_runs_with_a_root_owned_config(stack: Stack) -> None:
    config = stack.broker_config.stat()
    assert (config.st_uid, stat.S_IMODE(config.st_mode)) == (0, 0o644)
    text = stack.broker_config.read_text()
    assert 'client_user = "blockbroker"' in text
    assert f'"{stack.image_dir}"' in text
    assert stat.S_ISSOCK(stack.broker_socket.stat().st_mode)
    # Ready means the socket accepts; the broker logs its own "ready" line a moment later.
    assert stack.daemons["broker"].running()


def test_bus_policy_only_the_service_user_owns_the_name(stack: Stack) -> None:
    denied = request_name(stack, BUS_NAME, f"--reuid={NOBODY}", f"--regid={NOBODY}")
    assert denied.returncode != 0
    assert "AccessDenied" in denied.stderr
    allowed = request_name(stack, BUS_NAME, f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}")
    assert allowed.returncode == 0, allowed.stderr
    assert "uint32 1" in allowed.stdout  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER


def test_bus_default_policy_denies_owning_other_names(stack: Stack) -> None:
    denied = request_name(stack, "org.example.Anything", f"--reuid={NOBODY}", f"--regid={NOBODY}")
    assert "AccessDenied" in denied.stderr


def test_make_image_lands_in_an_allowed_root_without_loops(stack: Stack) -> None:
    image = stack.make_image("probe.img", size=1 << 20, content=b"hello")
    assert image.parent == stack.image_dir
    assert image.stat().st_size == 1 << 20
    assert stack.leaked_loops() == []
    image.unlink()


PROBE_ACTION = "org.example.devstack.probe"
PROBE_POLICY = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE policyconfig PUBLIC "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/PolicyKit/1/policyconfig.dtd">
<policyconfig>
  <action id="org.example.devstack.probe">
    <description>devstack test action</description>
    <message>devstack test action</message>
    <defaults><allow_any>no</allow_any><allow_inactive>no</allow_inactive>
      <allow_active>no</allow_active></defaults>
  </action>
</policyconfig>
"""
PROBE_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.example.devstack.probe" && subject.user == "blockbroker")
        return polkit.Result.YES;
});
"""


def check_authorization(stack: Stack, pid: int, uid: int) -> str:
    """polkit's verdict for a unix-process subject, asked as root over the stack's bus."""
    start_time = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    result = subprocess.run(
        [
            "busctl",
            f"--address={stack.bus_address}",
            "call",
            POLKIT_BUS_NAME,
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            "unix-process",
            "3",
            "pid",
            "u",
            str(pid),
            "start-time",
            "t",
            start_time,
            "uid",
            "i",
            str(uid),
            PROBE_ACTION,
            "0",
            "0",
            "",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_polkitd_decides_with_the_given_rules_and_actions(
    stack_factory: Callable[[StackConfig], Stack], tmp_path: Path
) -> None:
    rules, actions = tmp_path / "rules.d", tmp_path / "actions"
    rules.mkdir()
    actions.mkdir()
    (rules / "10-probe.rules").write_text(PROBE_RULE)
    (actions / "org.example.devstack.policy").write_text(PROBE_POLICY)
    config = StackConfig(
        broker=False, policyd=False, polkit_rules=rules, project_polkit_actions_dir=actions
    )
    polkit_stack = stack_factory(config)
    assert polkit_stack.has_owner(POLKIT_BUS_NAME)
    assert polkit_stack.polkit_rules_dir.stat().st_mode & 0o777 == 0o700
    verdicts = {}
    for user in (SERVICE_USER, str(NOBODY)):
        # The subject reports in once setpriv has switched to `user`, then keeps its pid.
        sleeper = subprocess.Popen(
            ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
             "sh", "-c", "echo switched; exec sleep 60"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert sleeper.stdout is not None and sleeper.stdout.readline() == "switched\n"
            uid = int(Path(f"/proc/{sleeper.pid}/status").read_text().split("Uid:")[1].split()[0])
            verdicts[user] = check_authorization(polkit_stack, sleeper.pid, uid)
        finally:
            sleeper.kill()
            sleeper.wait()
    assert verdicts[SERVICE_USER].startswith("(bba{ss}) true false")
    assert verdicts[str(NOBODY)].startswith("(bba{ss}) false false")


def test_blkback_sysfs_stand_in_is_readable_by_policyd_user(
    stack_factory: Callable[[StackConfig], Stack],
) -> None:
    bare = stack_factory(StackConfig(broker=False, policyd=False, sysfs_blkback=True))
    node = bare.blkback_open(frontend_domid=3, devid=51712, major=7, minor=10) / "physical_device"
    assert node == bare.sysfs_root / "bus/xen-backend/devices/vbd-3-51712/physical_device"
    result = subprocess.run(
        ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--clear-groups",
         "cat", str(node)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "7:a\n"), result.stderr
    bare.blkback_close(3, 51712)
    assert not node.exists()


def test_without_blkback_sysfs_the_host_has_no_xen_backend_bus(stack: Stack) -> None:
    assert stack.sysfs_root.is_dir()
    assert not (stack.sysfs_root / "bus").exists()


def test_xs_write_accepts_an_empty_value(stack: Stack) -> None:
    stack.xs_write("/local/domain/0/backend/vbd/2/51712/mode", "r")
    stack.xs_write("/local/domain/0/backend/vbd/2/51712/mode", "")
    assert stack.xs_read("/local/domain/0/backend/vbd/2/51712/mode") == ""
    stack.xs_rm("/local/domain/0/backend/vbd/2")


def test_two_stacks_at_once_are_isolated(stack_factory: Callable[[StackConfig], Stack]) -> None:
    first = stack_factory(StackConfig(domains={"one": 5}, broker=False, policyd=False))
    second = stack_factory(StackConfig(domains={"two": 5}, broker=False, policyd=False))
    assert first.xenstore_path != second.xenstore_path
    assert first.bus_address != second.bus_address
    assert (first.xs_read("/local/domain/5/name"), second.xs_read("/local/domain/5/name")) == (
        "one",
        "two",
    )


def test_run_as_another_user_reaches_the_stack(stack: Stack) -> None:
    as_service = stack.run(["xenstore-read", "/local/domain/1/name"], user=SERVICE_USER)
    assert (as_service.returncode, as_service.stdout) == (0, "work\n"), as_service.stderr
    as_nobody = stack.run(["id", "-u"], user=NOBODY, check=True)
    assert as_nobody.stdout.strip() == str(NOBODY)
    # nobody is not in group blockbroker: the XenStore socket is out of reach
    denied = stack.run(["xenstore-read", "/local/domain/1/name"], user=NOBODY)
    assert denied.returncode != 0
