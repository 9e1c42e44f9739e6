"""The running service's introspection matches dbus/*.xml (the documented contract), and the
bus policy file parses.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from harness.names import EXPORT_IFACE, MANAGER, MANAGER_IFACE, OM_IFACE
from harness.stack import Stack
from policydlab import Api, assert_clean

pytestmark = [pytest.mark.root, pytest.mark.daemon]

DBUS_DIR = Path(__file__).resolve().parents[2] / "dbus"

Shape = dict[str, object]


def interface_shape(root: ET.Element, name: str) -> Shape:
    """Methods with (name, type, direction) args, properties with (type, access), signals."""
    iface = root.find(f"interface[@name='{name}']")
    assert iface is not None, f"{name} not found"
    methods = {
        m.get("name"): [
            (a.get("name"), a.get("type"), a.get("direction", "in")) for a in m.findall("arg")
        ]
        for m in iface.findall("method")
    }
    # dbus-fast names no out args; compare out args by type only
    for args in methods.values():
        args[:] = [(n if d == "in" else None, t, d) for n, t, d in args]
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in iface.findall("property")}
    signals = {s.get("name") for s in iface.findall("signal")}
    return {"methods": methods, "properties": props, "signals": signals}


def test_manager_introspection_matches_the_xml(stack: Stack, api: Api) -> None:
    live = ET.fromstring(api.introspect())
    documented = ET.parse(DBUS_DIR / "org.qubes.BlockBroker1.Manager.xml").getroot()
    assert interface_shape(live, MANAGER_IFACE) == interface_shape(documented, MANAGER_IFACE)
    names = {i.get("name") for i in live.findall("interface")}
    assert "org.freedesktop.DBus.ObjectManager" in names


def test_export_introspection_matches_the_xml(stack: Stack, api: Api) -> None:
    image = stack.make_image("introspect.img")
    export = api.export(image)
    live = ET.fromstring(api.introspect(export))
    documented = ET.parse(DBUS_DIR / "org.qubes.BlockBroker1.Export.xml").getroot()
    assert interface_shape(live, EXPORT_IFACE) == interface_shape(documented, EXPORT_IFACE)
    children = {n.get("name") for n in ET.fromstring(api.introspect()).findall("node")}
    assert "export" in children
    api.detach(export)
    assert_clean(stack, image)


def test_bus_policy_names_only_the_service_user_as_owner() -> None:
    root = ET.parse(DBUS_DIR / "org.qubes.BlockBroker1.conf").getroot()
    owners = [
        (p.get("user"), p.get("context"))
        for p in root.findall("policy")
        if any(a.get("own") == "org.qubes.BlockBroker1" for a in p.findall("allow"))
    ]
    assert owners == [("blockbroker", None)]


def test_managed_objects_answer_as_dbus_fast_does(stack: Stack, api: Api) -> None:
    """policyd builds GetManagedObjects at the Manager from its records (policyd.bus.connection);
    at "/" dbus-fast builds it from the property getters. Apart from the Manager itself, which
    only "/" includes, the two answers are the same, values and signatures."""
    images = [stack.make_image(f"managed-{i}.img") for i in range(3)]
    exports = [api.export(image) for image in images]
    ours = api.ok("GetManagedObjects", path=MANAGER, iface=OM_IFACE)
    theirs = api.ok("GetManagedObjects", path="/", iface=OM_IFACE)
    assert MANAGER_IFACE in theirs.pop(MANAGER)
    assert sorted(ours) == sorted(exports)
    assert ours == theirs
    for export in exports:
        api.detach(export)
    assert api.ok("GetManagedObjects", path=MANAGER, iface=OM_IFACE) == {}
    assert_clean(stack, *images)
