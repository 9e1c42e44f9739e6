"""The shipped systemd units and D-Bus activation file: systemd 252 accepts them without a
warning, and they say what the design asks (policyd unprivileged with no capabilities and an fd
store; the broker socket-activated and reachable only by policyd's group).

Runs as root (systemd-analyze verify resolves the units' users and executables).
"""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

DBUS_DIR = Path(__file__).resolve().parents[2] / "dbus"
UNITS = ["blockbroker-policyd.service", "blockbroker-broker.service", "blockbroker-broker.socket"]


def unit(name: str) -> dict[str, list[str]]:
    """key -> values (keys may repeat in unit files)."""
    values: dict[str, list[str]] = {}
    for line in (DBUS_DIR / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize("name", UNITS)
def test_systemd_accepts_the_unit(name: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", name],
        cwd=DBUS_DIR,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_policyd_unit_is_unprivileged_with_an_fd_store() -> None:
    u = unit("blockbroker-policyd.service")
    assert u["User"] == ["blockbroker"] and u["Type"] == ["dbus"]
    assert u["BusName"] == ["org.qubes.BlockBroker1"]
    assert u["CapabilityBoundingSet"] == [""] and u["NoNewPrivileges"] == ["yes"]
    assert int(u["FileDescriptorStoreMax"][0]) > 0
    assert u["RestrictAddressFamilies"] == ["AF_UNIX"]


def test_broker_socket_is_for_policyd_only() -> None:
    s = unit("blockbroker-broker.socket")
    assert s["ListenSequentialPacket"] == ["/run/blockbroker/broker.sock"]
    assert s["SocketGroup"] == ["blockbroker"] and s["SocketMode"] == ["0660"]
    policyd = unit("blockbroker-policyd.service")
    assert any("/run/blockbroker/broker.sock" in cmd for cmd in policyd["ExecStart"])


def test_activation_file_names_the_service() -> None:
    parser = configparser.ConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DBUS_DIR / "org.qubes.BlockBroker1.service")
    service = parser["D-BUS Service"]
    assert service["Name"] == "org.qubes.BlockBroker1"
    assert service["User"] == "blockbroker"
    assert service["SystemdService"] == "blockbroker-policyd.service"
