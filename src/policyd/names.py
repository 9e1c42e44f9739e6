"""The bus contract: policyd's bus name, object paths and interface names, in one place.

Unprivileged policyd code; constants only. The client keeps its own copy (src/client/model.py:
the VM-side tools must not import policyd); tests/client/test_contract.py pins the two
together, and the introspection test pins the interfaces to dbus/*.xml.
"""

from __future__ import annotations

import re

BUS_NAME = "org.qubes.BlockBroker1"
MANAGER_PATH = "/org/qubes/BlockBroker1"
EXPORT_PATH_PREFIX = MANAGER_PATH + "/export/"
REQUEST_PATH_PREFIX = MANAGER_PATH + "/request/"
MANAGER_IFACE = BUS_NAME + ".Manager"
EXPORT_IFACE = BUS_NAME + ".Export"
REQUEST_IFACE = BUS_NAME + ".Request"
ERROR_PREFIX = BUS_NAME + ".Error."
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

_NUMBER = r"([1-9][0-9]{0,9})"
EXPORT_PATH_RE = re.compile(re.escape(EXPORT_PATH_PREFIX) + _NUMBER)
REQUEST_PATH_RE = re.compile(re.escape(REQUEST_PATH_PREFIX) + _NUMBER)


def export_path(number: int) -> str:
    return f"{EXPORT_PATH_PREFIX}{number}"


def request_path(number: int) -> str:
    return f"{REQUEST_PATH_PREFIX}{number}"


def number_in(path_re: re.Pattern[str], untrusted_path: object) -> int | None:
    """The object number in an export's or request's path; None if it is not one."""
    m = path_re.fullmatch(untrusted_path) if isinstance(untrusted_path, str) else None
    return int(m[1]) if m else None
