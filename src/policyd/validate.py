"""Bounded, strict grammars for everything policyd reads from the bus and from XenStore.

Unprivileged policyd code; input from the bus and from XenStore is validated here, in one place.
Values are named `untrusted_*` until one of these functions has accepted them; every rejection
raises InvalidArgument (bus input) or XenStoreError (XenStore content) with a message that names
the field and what is expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policyd import modes
from policyd.errors import InvalidArgument, PolicydError, XenStoreError
from policyd.policy import DOMAIN_NAME_GRAMMAR, DOMAIN_NAME_RE

DOMID_RE = re.compile(r"0|[1-9][0-9]{0,4}")
BACKEND_PATH_RE = re.compile(
    r"/local/domain/(0|[1-9][0-9]{0,4})/backend/vbd/(0|[1-9][0-9]{0,4})/([1-9][0-9]{0,9})"
)
RELATIVE_BACKEND_PREFIX = "backend/vbd/"
BACKEND_TYPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1
MAX_PATH_BYTES = 4095
XVD_MAJOR = 202
EXTENDED_VDEV = 1 << 28
FIRST_HOTPLUG_DISK = 1  # xvdb: xvda is usually the guest's root disk
LAST_HOTPLUG_DISK = 701  # xvdzz: a bound on the search, far above any real guest
OPTION_TYPES = {"read-only": "b", "devid": "u", "direct-io": "b", "dm-uuid": "s"}
# a device-mapper uuid as the kernel keeps it (DM_UUID_LEN 129 with its NUL): LVM's is
# LVM-<vg uuid><lv uuid>, 68 characters
DM_UUID_RE = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class ExportOptions:
    read_only: bool = True
    devid: int | None = None
    direct_io: bool = False
    dm_uuid: str = ""  # the device must be the device-mapper device with this uuid


@dataclass(frozen=True)
class BackendPath:
    path: str
    backend_domid: int
    frontend_domid: int
    devid: int


def domain_name(untrusted_name: object, error: type[PolicydError] = InvalidArgument) -> str:
    if not isinstance(untrusted_name, str) or not DOMAIN_NAME_RE.fullmatch(untrusted_name):
        raise error(
            f"domain name {_show(untrusted_name)} is invalid: expected {DOMAIN_NAME_GRAMMAR}"
        )
    return untrusted_name


def domid(untrusted_text: str, error: type[PolicydError] = XenStoreError) -> int:
    if not DOMID_RE.fullmatch(untrusted_text) or int(untrusted_text) > MAX_DOMID:
        raise error(f"domain id {_show(untrusted_text)} is invalid: expected 0-{MAX_DOMID}")
    return int(untrusted_text)


def backend_path(untrusted_path: object, home_domid: int = 0) -> BackendPath:
    """An absolute vbd backend path, or libxl's relative form.

    libxl hands hotplug scripts XENBUS_PATH relative to the backend domain's home
    ("backend/vbd/<fe>/<devid>"); that form is taken as below /local/domain/<home_domid>.
    """
    if not isinstance(untrusted_path, str):
        raise InvalidArgument("backend path must be a string")
    if untrusted_path.startswith(RELATIVE_BACKEND_PREFIX):
        untrusted_path = f"/local/domain/{home_domid}/{untrusted_path}"
    m = BACKEND_PATH_RE.fullmatch(untrusted_path)
    if m is None:
        raise InvalidArgument(
            f"backend path {_show(untrusted_path)} is malformed: expected "
            "/local/domain/<backend-domid>/backend/vbd/<frontend-domid>/<devid>"
        )
    be, fe, dev = int(m[1]), int(m[2]), int(m[3])
    if be > MAX_DOMID or fe > MAX_DOMID:
        raise InvalidArgument(f"backend path {untrusted_path}: domain id above {MAX_DOMID}")
    if not is_disk_devid(dev):
        raise InvalidArgument(f"backend path {untrusted_path}: {dev} is not a vbd device number")
    return BackendPath(untrusted_path, be, fe, dev)


def source_path(untrusted_path: object, error: type[PolicydError] = InvalidArgument) -> str:
    """An absolute, normalized path of at most 4095 bytes without control characters."""
    if not isinstance(untrusted_path, str) or not untrusted_path:
        raise error("path must be a non-empty string")
    if len(untrusted_path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise error(f"path is longer than {MAX_PATH_BYTES} bytes")
    if not untrusted_path.isascii() or not untrusted_path.isprintable():
        raise error(
            f"path {_show(untrusted_path)} must be printable ASCII (XenStore holds only ASCII)"
        )
    if not untrusted_path.startswith("/") or os.path.normpath(untrusted_path) != untrusted_path:
        raise error(
            f"path {_show(untrusted_path)} must be absolute and normalized "
            "(no '.', '..', '//' or trailing '/')"
        )
    if untrusted_path.startswith("//"):
        raise error(f"path {_show(untrusted_path)} must not start with '//'")
    return untrusted_path


def mode(untrusted_mode: str) -> str:
    if untrusted_mode not in modes.MODES:
        raise XenStoreError(f"mode {_show(untrusted_mode)} is invalid: expected 'r' or 'w'")
    return untrusted_mode


def backend_type(untrusted_type: str) -> str:
    if not BACKEND_TYPE_RE.fullmatch(untrusted_type):
        raise XenStoreError(f"type {_show(untrusted_type)} is invalid")
    return untrusted_type


def is_disk_devid(devid: int) -> bool:
    """A whole-disk xvd device number (partition 0), in either encoding libxl uses."""
    if devid >> 8 == XVD_MAJOR:
        return devid & 0xF == 0
    if devid & EXTENDED_VDEV and devid < EXTENDED_VDEV << 1:
        return devid & 0xFF == 0
    return False


def devid_of_disk(disk: int) -> int:
    if disk <= 15:
        return (XVD_MAJOR << 8) | (disk << 4)
    return EXTENDED_VDEV | (disk << 8)


def disk_of_devid(devid: int) -> int:
    if devid >> 8 == XVD_MAJOR:
        return (devid >> 4) & 0xF
    return (devid & ~EXTENDED_VDEV) >> 8


def vdev_name(devid: int) -> str:
    """xvd name of a whole-disk devid: 51728 -> xvdb, disk 26 -> xvdaa."""
    disk = disk_of_devid(devid)
    letters = ""
    n = disk + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "xvd" + letters


def hotplug_devids() -> list[int]:
    """Candidates for Export without a devid option, in allocation order (xvdb first)."""
    return [devid_of_disk(d) for d in range(FIRST_HOTPLUG_DISK, LAST_HOTPLUG_DISK + 1)]


def typed_dict(
    untrusted: object, types: Mapping[str, str], *, container: str, item: str
) -> dict[str, Any]:
    """The values of an a{sv} whose every key is in `types` with exactly that signature;
    InvalidArgument names the offending key (e.g. container "options", item "option")."""
    if not isinstance(untrusted, dict):
        raise InvalidArgument(f"{container} must be a{{sv}}")
    values: dict[str, Any] = {}
    for untrusted_key, untrusted_variant in untrusted.items():
        expected = types.get(untrusted_key) if isinstance(untrusted_key, str) else None
        if expected is None:
            raise InvalidArgument(
                f"unknown {item} {_show(untrusted_key)}; known {item}s: {', '.join(sorted(types))}"
            )
        if getattr(untrusted_variant, "signature", None) != expected:
            raise InvalidArgument(f"{item} {untrusted_key} must have type '{expected}'")
        values[untrusted_key] = untrusted_variant.value
    return values


def export_options(untrusted_options: object) -> ExportOptions:
    values = typed_dict(untrusted_options, OPTION_TYPES, container="options", item="option")
    devid = values.get("devid")
    if devid is not None and not is_disk_devid(devid):
        raise InvalidArgument(
            f"devid {devid} is not a whole-disk xvd device number (e.g. 51728 for xvdb)"
        )
    dm_uuid = values.get("dm-uuid", "")
    if dm_uuid and not DM_UUID_RE.fullmatch(dm_uuid):
        raise InvalidArgument(
            f"dm-uuid {_show(dm_uuid)} is invalid: expected 1-128 printable ASCII characters "
            "without spaces (LVM's: LVM-<vg uuid><lv uuid>)"
        )
    return ExportOptions(
        read_only=bool(values.get("read-only", True)),
        devid=devid,
        direct_io=bool(values.get("direct-io", False)),
        dm_uuid=dm_uuid,
    )


def _show(value: object, limit: int = 64) -> str:
    """A bounded, printable rendering of an untrusted value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
