"""The real polkitd on the stack's bus, with given rules and only the project's actions.

Test harness, runs as root; polkitd drops to user polkitd itself. It runs in its own mount
namespace where the stack's rules.d and actions dirs are bind-mounted over the system ones;
/usr/share/polkit-1/rules.d (Debian's 50-default.rules: admins are group sudo) stays.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
from pathlib import Path

from harness import ns
from harness.procs import Daemon

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_USER = "polkitd"
BUS_NAME = "org.freedesktop.PolicyKit1"
SYSTEM_RULES_DIR = Path("/etc/polkit-1/rules.d")
SYSTEM_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")


def polkitd_daemon(
    polkit_dir: Path, rules: Path, actions_from: Path, bus_address: str, log_path: Path
) -> Daemon:
    """Copy `rules`/*.rules and `actions_from`/*.policy under `polkit_dir`; a Daemon for polkitd."""
    polkit = pwd.getpwnam(POLKIT_USER)
    rules_dir, actions_dir = polkit_dir / "rules.d", polkit_dir / "actions"
    for directory in (rules_dir, actions_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for policy in sorted(actions_from.glob("*.policy")):
        shutil.copy(policy, actions_dir / policy.name)
    for rule in sorted(rules.glob("*.rules")):
        shutil.copy(rule, rules_dir / rule.name)
    # polkitd (as user polkitd) refuses to read a rules dir it does not own.
    for path in [rules_dir, *rules_dir.iterdir()]:
        os.chown(path, polkit.pw_uid, polkit.pw_gid)
    rules_dir.chmod(0o700)
    return Daemon(
        name="polkitd",
        argv=[str(POLKITD), "--no-debug"],
        log_path=log_path,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": bus_address},
        preexec=functools.partial(
            ns.private_binds,
            [(rules_dir, SYSTEM_RULES_DIR), (actions_dir, SYSTEM_ACTIONS_DIR)],
        ),
    )
