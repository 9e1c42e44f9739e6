"""A VM's own block device: its descriptor, the identity it publishes, and its vbd nodes.

Unprivileged policyd code. The descriptor comes from a VM (through the qrexec bridge) and is
untrusted: `device_descriptor()` is the one place that validates it (values are named
`untrusted_*` until then). The VM publishes the device it means in its own XenStore dir,
/local/domain/<source-domid>/data/blockbroker/<name>/{dev,diskseq} ("MAJOR:MINOR" and the
decimal diskseq, as sysfs shows them); `write_vm_vbd` re-reads that in the transaction that
writes the nodes and raises DeviceChanged (writing nothing) unless it still names the requested
major:minor and diskseq. The device lives in the VM, so nothing here opens anything: the vbd's
backend is the source VM, whose blkback opens /dev/NAME. See docs/requests.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policyd import errors, modes, validate
from policyd.xenstore.client import XenStoreValueError
from policyd.xenstore.store import (
    HOTPLUG_DEVIDS,
    MAX_DOMAINS,
    Tx,
    VbdSpec,
    XenStore,
    first_free_devid,
    physical_nodes,
    write_vbd,
)

PUBLISHED_DIR = "data/blockbroker"  # below /local/domain/<source-domid>/
DEVICE_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
DESCRIPTION_RE = re.compile(r"[ -~]{0,64}")  # printable ASCII, bounded
PUBLISHED_DEV_RE = re.compile(r"([1-9][0-9]{0,3}):(0|[1-9][0-9]{0,6})")
PUBLISHED_DISKSEQ_RE = re.compile(r"[1-9][0-9]{0,19}")
MAX_MAJOR = (1 << 12) - 1  # Linux MAJORBITS
MAX_MINOR = (1 << 20) - 1  # Linux MINORBITS
DESCRIPTOR_TYPES = {
    "name": "s",
    "major": "u",
    "minor": "u",
    "diskseq": "t",
    "size": "t",
    "read-only": "b",
    "description": "s",
}
REQUIRED_KEYS = frozenset(DESCRIPTOR_TYPES) - {"description"}
OPTION_TYPES = {"read-only": "b", "timeout": "u"}


@dataclass(frozen=True)
class DeviceDescriptor:
    """A VM's block device, as the VM describes it (validated, still the VM's claim)."""

    name: str
    major: int
    minor: int
    diskseq: int
    size: int
    read_only: bool
    description: str


@dataclass(frozen=True)
class RequestOptions:
    read_only: bool
    expiry_s: int


def device_descriptor(untrusted_device: object) -> DeviceDescriptor:
    """The one validation of a VM's device descriptor (a{sv}); InvalidArgument names the field."""
    values = validate.typed_dict(
        untrusted_device, DESCRIPTOR_TYPES, container="device", item="device field"
    )
    missing = REQUIRED_KEYS - set(values)
    if missing:
        raise errors.InvalidArgument(f"device fields missing: {', '.join(sorted(missing))}")
    untrusted_name = values["name"]
    if not DEVICE_NAME_RE.fullmatch(untrusted_name):
        raise errors.InvalidArgument(
            f"device name {validate._show(untrusted_name)} is invalid: expected a-z, then up "
            "to 15 of a-z 0-9 (loop0, sda1, xvdi)"
        )
    if not 1 <= values["major"] <= MAX_MAJOR:
        raise errors.InvalidArgument(f"device major {values['major']} is not in 1-{MAX_MAJOR}")
    if not 0 <= values["minor"] <= MAX_MINOR:
        raise errors.InvalidArgument(f"device minor {values['minor']} is not in 0-{MAX_MINOR}")
    if values["diskseq"] == 0:
        raise errors.InvalidArgument(
            "device diskseq is 0: the VM's kernel must report a diskseq (Linux 5.15+); "
            "an approval is pinned to it"
        )
    if values["size"] == 0:
        raise errors.InvalidArgument("device size is 0: nothing to export")
    untrusted_description = values.get("description", "")
    if not DESCRIPTION_RE.fullmatch(untrusted_description):
        raise errors.InvalidArgument(
            "device description must be at most 64 printable ASCII characters"
        )
    return DeviceDescriptor(
        name=untrusted_name,
        major=values["major"],
        minor=values["minor"],
        diskseq=values["diskseq"],
        size=values["size"],
        read_only=values["read-only"],
        description=untrusted_description,
    )


def request_options(
    untrusted_options: object, device: DeviceDescriptor, max_expiry_s: int
) -> RequestOptions:
    """read-only (b, default true), timeout (u seconds, 1 to policyd's --request-expiry)."""
    values = validate.typed_dict(
        untrusted_options, OPTION_TYPES, container="options", item="option"
    )
    read_only = bool(values.get("read-only", True))
    if device.read_only and not read_only:
        raise errors.InvalidArgument(f"{device.name} is read-only in its VM; ask for read-only")
    expiry = values.get("timeout", max_expiry_s)
    if not 1 <= expiry <= max_expiry_s:
        raise errors.InvalidArgument(f"timeout must be 1-{max_expiry_s} seconds")
    return RequestOptions(read_only, expiry)


def published_dir(source_domid: int, name: str) -> str:
    return f"/local/domain/{source_domid}/{PUBLISHED_DIR}/{name}"


async def check_published(tx: Tx, source_domid: int, device: DeviceDescriptor) -> None:
    """DeviceChanged unless the VM still publishes the same major:minor and diskseq."""
    base = published_dir(source_domid, device.name)
    try:
        untrusted_dev, untrusted_diskseq = await tx.read_many([f"{base}/dev", f"{base}/diskseq"])
    except XenStoreValueError as e:  # junk the VM wrote; XenStore failing stays Error.XenStore
        raise errors.DeviceChanged(f"{base} is unreadable ({e}); nothing was written") from None
    want = f"{device.major}:{device.minor} diskseq {device.diskseq}"
    if untrusted_dev is None or untrusted_diskseq is None:
        raise errors.DeviceChanged(
            f"the VM no longer publishes {device.name} ({base}/dev, diskseq); the approved "
            f"device ({want}) is gone: nothing was written"
        )
    m = PUBLISHED_DEV_RE.fullmatch(untrusted_dev)
    seq_ok = PUBLISHED_DISKSEQ_RE.fullmatch(untrusted_diskseq) is not None
    now = (int(m[1]), int(m[2])) if m else None
    seq = int(untrusted_diskseq) if seq_ok else None
    if now != (device.major, device.minor) or seq != device.diskseq:
        raise errors.DeviceChanged(
            f"{device.name} in the VM is now {validate._show(untrusted_dev, 16)} diskseq "
            f"{validate._show(untrusted_diskseq, 24)}, not {want} as requested: nothing was "
            "written; the VM must ask again"
        )


async def check_not_shared(tx: Tx, spec: VbdSpec) -> None:
    """Busy if the VM's device is exported read-write, or rw is asked while it is exported at
    all (the same rule as for dom0's exports). Read from the VM's backend nodes, which policyd
    wrote (the VM can read them, but their owner is policyd's domain only until blkback runs)."""
    phys = spec.physical
    wanted = dict(physical_nodes(phys))["physical-device"]
    base = f"/local/domain/{spec.backend_domid}/backend/vbd"
    for frontend in (await tx.children(base))[:MAX_DOMAINS]:
        devids = (await tx.children(f"{base}/{frontend}"))[:MAX_DOMAINS]
        be_dirs = [f"{base}/{frontend}/{devid}" for devid in devids]
        devices = await tx.read_many([f"{be_dir}/physical-device" for be_dir in be_dirs])
        for be_dir, device in zip(be_dirs, devices, strict=True):
            if device != wanted:
                continue
            if modes.is_writable(spec.mode) or await tx.read(f"{be_dir}/mode") != modes.READ_ONLY:
                raise errors.Busy(
                    f"{phys.device_path} of the VM is already exported ({be_dir}); a read-write "
                    "export needs it exclusively, and a read-write one is never shared"
                )


async def write_vm_vbd(
    xs: XenStore, spec: VbdSpec, source_domid: int, device: DeviceDescriptor
) -> int:
    """In one transaction: re-check the published device, check sharing, pick a devid, write
    FE and BE nodes. Returns the devid."""

    async def body(tx: Tx) -> int:
        await check_published(tx, source_domid, device)
        await check_not_shared(tx, spec)
        chosen = await first_free_devid(tx, spec, HOTPLUG_DEVIDS)
        if not chosen:
            raise errors.Busy(f"no free xvd device number in domain {spec.frontend_domid}")
        await write_vbd(tx, spec, chosen)
        return chosen

    return await xs.transact(body)


async def check_published_now(xs: XenStore, source_domid: int, device: DeviceDescriptor) -> None:
    """The early check, outside a transaction: its answer is advisory (the VM may change what it
    publishes right after); write_vm_vbd's check, in the transaction that writes, decides."""
    await xs.reads(lambda tx: check_published(tx, source_domid, device))
