"""The whole stack with policyd: it runs as user blockbroker, owns its name, restarts cleanly.

Test harness tests, run as root against real oxenstored, dbus-daemon, broker and policyd.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.names import BUS_NAME, DBUS_IFACE, DBUS_NAME, DBUS_PATH
from harness.stack import SERVICE_USER, Stack, StackConfig

pytestmark = [pytest.mark.root, pytest.mark.daemon]

DEVSTACK = Path(__file__).resolve().parents[2] / "scripts" / "devstack"


def owner_uid(stack: Stack) -> int:
    result = subprocess.run(
        ["busctl", "--system", "call", DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixUser",
         "s", BUS_NAME],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    kind, uid = result.stdout.split()
    assert kind == "u"
    return int(uid)


def test_policyd_owns_its_name_as_the_service_user(stack: Stack) -> None:
    assert stack.has_owner(BUS_NAME)
    assert owner_uid(stack) == pwd.getpwnam(SERVICE_USER).pw_uid
    assert stack.daemons["policyd"].running()


def test_restart_policyd_takes_the_name_again(stack: Stack) -> None:
    old_pid = stack.daemons["policyd"].pid
    stack.restart_policyd()
    assert stack.daemons["policyd"].pid != old_pid
    assert stack.has_owner(BUS_NAME)


def test_stop_policyd_releases_the_name(stack: Stack) -> None:
    assert stack.stop_policyd() == []
    assert not stack.has_owner(BUS_NAME)
    stack.start_policyd()
    assert stack.has_owner(BUS_NAME)


def test_devstack_runs_policyd_by_default() -> None:
    script = (
        "busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus "
        f"GetConnectionUnixUser s {BUS_NAME}"
    )
    result = subprocess.run(
        [sys.executable, str(DEVSTACK), "--domain", "work=1", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["u", str(pwd.getpwnam(SERVICE_USER).pw_uid)]
    assert "daemon=policyd" in result.stderr


def test_policy_dir_under_a_private_parent_is_copied_for_policyd(
    stack_factory: Callable[[StackConfig], Stack], tmp_path: Path
) -> None:
    assert tmp_path.stat().st_mode & 0o077 == 0, "pytest's tmp dirs are private to root"
    policy = tmp_path / "policy.d"
    shutil.copytree(Path(__file__).resolve().parents[2] / "policy" / "policy.d", policy)
    private = stack_factory(StackConfig(domains={"work": 1}, policy_dir=policy))
    assert private.has_owner(BUS_NAME)
    assert sorted(p.name for p in private.policy_dir.iterdir()) == sorted(
        p.name for p in policy.iterdir()
    )
    readable = private.run(["cat", *map(str, private.policy_dir.iterdir())], user=SERVICE_USER)
    assert readable.returncode == 0, readable.stderr


def test_export_still_held_by_policyd_at_exit_is_not_a_leak() -> None:
    # policyd holds the loop fd (AUTOCLEAR); stopping policyd frees it, so teardown is clean.
    script = (
        'truncate -s 1M "$BLOCKBROKER_IMAGE_DIR/held.img" && '
        'blockbroker export --to work "$BLOCKBROKER_IMAGE_DIR/held.img" >/dev/null && '
        'losetup -j "$BLOCKBROKER_IMAGE_DIR/held.img" | grep -c /dev/loop'
    )
    result = subprocess.run(
        [sys.executable, str(DEVSTACK), "--domain", "work=1", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
