"""The names blockbroker and the bus daemon answer to on D-Bus, for tests and benchmarks.

Test harness (plain constants, no trust decision). One place for them, so a renamed interface or
object path is one edit; the service's own copies live in src/ and tests check those separately.
"""

from __future__ import annotations

# blockbroker's service
BUS_NAME = "org.qubes.BlockBroker1"
MANAGER = "/org/qubes/BlockBroker1"  # the Manager object's path
MANAGER_IFACE = "org.qubes.BlockBroker1.Manager"
EXPORT_IFACE = "org.qubes.BlockBroker1.Export"
REQUEST_IFACE = "org.qubes.BlockBroker1.Request"
ERROR_PREFIX = "org.qubes.BlockBroker1.Error."  # every error name of the service starts so

# the standard interfaces every object has
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
PEER_IFACE = "org.freedesktop.DBus.Peer"

# the bus daemon itself
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"


def short_error(name: str | None) -> str | None:
    """The part after ERROR_PREFIX of one of the service's error names; any other name whole."""
    if name is not None and name.startswith(ERROR_PREFIX):
        return name[len(ERROR_PREFIX) :]
    return name
