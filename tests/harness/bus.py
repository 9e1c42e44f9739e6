"""A private dbus-daemon acting as the system bus, with the project's own bus policy.

Test harness, runs as root (the daemon drops to messagebus after binding, like the real system
bus). The policy is the stock default-deny system policy plus exactly these includes: polkit's
bus policy (so polkitd can own its name), every *.conf in the repository's dbus/ directory
(org.qubes.BlockBroker1.conf), and the stack's own bus/system.d for tests that need more.
Nothing from /etc/dbus-1/system.d, so an installed copy of the project's policy cannot mask
the one under test.
"""

from __future__ import annotations

import os
import pwd
import select
from pathlib import Path
from xml.sax.saxutils import escape

from dbus_fast import MessageType

from harness.names import DBUS_IFACE, DBUS_NAME, DBUS_PATH
from harness.procs import Daemon, StackError
from harness.rawbus import SyncBus, message

POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")

# the stock system bus's default policy, shared with the Xen lab's bus (xenlab/scenarios)
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "dbus" / "dev" / "system-default-policy.conf"


def write_config(bus_dir: Path, project_policy_dir: Path) -> tuple[Path, str]:
    """Write bus_dir/system.conf; returns (config path, bus address)."""
    socket_path = bus_dir / "system_bus_socket"
    local_dir = bus_dir / "system.d"
    local_dir.mkdir(exist_ok=True)
    address = f"unix:path={socket_path}"
    user = "  <user>messagebus</user>\n" if _user_exists("messagebus") else ""
    default_policy = bus_dir / "default-policy.conf"  # a copy: the daemon reads it unprivileged
    default_policy.write_bytes(DEFAULT_POLICY.read_bytes())
    config = bus_dir / "system.conf"
    config.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        "<busconfig>\n"
        "  <type>system</type>\n"
        f"{user}"
        f"  <listen>{escape(address)}</listen>\n"
        "  <auth>EXTERNAL</auth>\n"
        f"  <include>{escape(str(default_policy))}</include>\n"
        f'  <include ignore_missing="yes">{escape(str(POLKIT_BUS_POLICY))}</include>\n'
        f"  <includedir>{escape(str(project_policy_dir))}</includedir>\n"
        f"  <includedir>{escape(str(local_dir))}</includedir>\n"
        "</busconfig>\n"
    )
    return config, address


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class BusDaemon(Daemon):
    """dbus-daemon; ready once it prints its address on a pipe (it is listening by then)."""

    def __init__(self, bus_dir: Path, project_policy_dir: Path, log_path: Path) -> None:
        self.config, self.address = write_config(bus_dir, project_policy_dir)
        self._address_r, self._address_w = os.pipe()
        self._printed = b""
        super().__init__(
            name="dbus",
            argv=[
                "dbus-daemon",
                f"--config-file={self.config}",
                "--nofork",
                "--nopidfile",
                "--nosyslog",
                f"--print-address={self._address_w}",
            ],
            log_path=log_path,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            pass_fds=(self._address_w,),
        )

    def start(self) -> None:
        try:
            super().start()
        finally:
            os.close(self._address_w)

    def address_printed(self) -> bool:
        while select.select([self._address_r], [], [], 0)[0]:
            chunk = os.read(self._address_r, 4096)
            if not chunk:
                break
            self._printed += chunk
        return self._printed.endswith(b"\n")

    def stop(self, timeout_s: float) -> list[str]:
        try:
            return super().stop(timeout_s)
        finally:
            os.close(self._address_r)


class BusProbe(SyncBus):
    """A root connection to the stack's bus for readiness checks (its own event loop)."""

    def has_owner(self, name: str) -> bool:
        reply = self.send(
            message("NameHasOwner", "s", [name], path=DBUS_PATH, iface=DBUS_IFACE, dest=DBUS_NAME)
        )
        if reply.message_type == MessageType.ERROR:
            raise StackError(f"NameHasOwner({name}) failed: {reply.error_name} {reply.body}")
        return bool(reply.body[0])
