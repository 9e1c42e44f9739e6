"""Unit tests of policyd's grammars and registry rules (no daemons, no root)."""

from __future__ import annotations

import pytest
from dbus_fast import Variant

from policyd import errors, validate
from policyd.brokerclient import Identity
from policyd.exports.registry import ExportRecord, Registry, file_key


@pytest.mark.parametrize("name", ["work", "Domain-0", "a", "x" * 31, "sys-usb.2_a"])
def test_domain_names_accepted(name: str) -> None:
    assert validate.domain_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 32, "a b", "a/b", "é", None, 5, "a\n"])
def test_domain_names_refused(name: object) -> None:
    with pytest.raises(errors.InvalidArgument):
        validate.domain_name(name)


def test_backend_path() -> None:
    be = validate.backend_path("/local/domain/0/backend/vbd/12/51728")
    assert (be.backend_domid, be.frontend_domid, be.devid) == (0, 12, 51728)
    extended = (1 << 28) | (30 << 8)
    assert validate.backend_path(f"/local/domain/0/backend/vbd/1/{extended}").devid == extended
    relative = validate.backend_path("backend/vbd/12/51728")  # libxl's XENBUS_PATH
    assert relative.path == "/local/domain/0/backend/vbd/12/51728"
    assert validate.backend_path("backend/vbd/1/51728", 5).backend_domid == 5
    for bad in (
        "/local/domain/0/backend/vbd/32752/51728",
        "/local/domain/0/backend/vbd/1/51729",
        "backend/vbd/1/51728/",
        "backend/vbd/../vbd/1/51728",
        "/backend/vbd/1/51728",
    ):
        with pytest.raises(errors.InvalidArgument):
            validate.backend_path(bad)


def test_vdev_names_and_allocation_order() -> None:
    assert validate.vdev_name(51712) == "xvda"
    assert validate.vdev_name(51728) == "xvdb"
    assert validate.vdev_name(51952) == "xvdp"
    assert validate.vdev_name((1 << 28) | (16 << 8)) == "xvdq"
    assert validate.vdev_name((1 << 28) | (26 << 8)) == "xvdaa"
    devids = validate.hotplug_devids()
    assert devids[:3] == [51728, 51744, 51760]
    assert all(validate.is_disk_devid(d) for d in devids)
    assert len(set(devids)) == len(devids)


def test_source_paths() -> None:
    assert validate.source_path("/var/lib/images/a.img") == "/var/lib/images/a.img"
    for bad in ("a.img", "/a/../b", "/a//b", "/a/", "//a", "/a\x00b", "/é", "/" + "a" * 4096):
        with pytest.raises(errors.InvalidArgument):
            validate.source_path(bad)


def test_export_options() -> None:
    assert validate.export_options({}) == validate.ExportOptions(True, None, False)
    opts = validate.export_options(
        {
            "read-only": Variant("b", False),
            "devid": Variant("u", 51744),
            "direct-io": Variant("b", True),
        }
    )
    assert opts == validate.ExportOptions(False, 51744, True)
    for bad in (
        {"devid": Variant("u", 5)},
        {"x": Variant("b", True)},
        {"read-only": Variant("s", "")},
    ):
        with pytest.raises(errors.InvalidArgument):
            validate.export_options(bad)


def record(registry: Registry, key: tuple[str, int, int], fd: int, writable: bool) -> ExportRecord:
    backing = registry.shareable(key, writable) or registry.new_backing(
        key, fd, Identity(7, fd, fd, 0, key[1], key[2]), "file", writable
    )
    number = registry.next_number()
    rec = ExportRecord(number, "/x", backing, 0, "", 1, "", 51728, f"/be/{number}", "r", 0, True)
    registry.add(rec)
    return rec


def test_registry_sharing_and_exclusion() -> None:
    reg = Registry()
    key = file_key(1, 2)
    a = record(reg, key, 100, False)
    b = record(reg, key, 101, False)
    assert a.backing is b.backing and reg.held_fds() == [100]
    with pytest.raises(errors.Busy):
        reg.shareable(key, True)
    assert reg.remove(a) is None
    assert reg.remove(b) == 100  # the last user hands the fd back to be closed
    w = record(reg, key, 102, True)
    with pytest.raises(errors.Busy):
        reg.shareable(key, False)
    assert reg.remove(w) == 102 and len(reg) == 0 and reg.held_fds() == []
