"""`blockbroker-gtk`'s launcher: runs the desktop tool under the system Python.

Runs as the calling user (a person at a dom0 desktop); no privilege. PyGObject and GTK come from
Debian's packages (python3-gi, gir1.2-gtk-4.0, gir1.2-adw-1), which only the system Python
sees; dbus-fast and this package live in the project's venv, which is made from that same
/usr/bin/python3 without system site-packages (the daemons' venv stays isolated). So the entry
point, run by the venv's Python, execs the base interpreter in isolated mode (-I: no
PYTHONPATH, no user site) with the venv's site-packages *appended* to sys.path: the system's
packages come first, the venv adds only what the system lacks. docs/client.md says why.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import NoReturn

# What the re-executed interpreter runs: the venv's site-packages last on sys.path, then the app.
BOOTSTRAP = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from client.gtk.app import main; sys.exit(main(sys.argv[1:]))"
)


def base_python() -> str:
    """The interpreter the venv was made from (pyvenv.cfg's home): /usr/bin/python3."""
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        candidate = os.path.join(sys.base_prefix, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def command(argv: list[str]) -> list[str]:
    """The argv that runs the app: base Python, isolated, this venv's site-packages appended."""
    site = sysconfig.get_paths()["purelib"]
    return [base_python(), "-I", "-c", BOOTSTRAP, site, *argv]


def main() -> NoReturn:
    argv = command(sys.argv[1:])
    os.execv(argv[0], argv)
