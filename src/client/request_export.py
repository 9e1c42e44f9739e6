"""`blockbroker request-export DEVICE --to VM`: run in a VM, ask dom0 to export DEVICE to VM.

Runs in the VM that owns the device, as a user who may read sysfs and write the VM's own
XenStore dir (qrexec-client-vm and xenstore-write need no privilege beyond that). It trusts
its own sysfs; dom0 trusts nothing it sends (the bridge validates everything).

Steps:
 1. read major:minor (/sys/class/block/NAME/dev), diskseq, size (512-byte sectors) and ro;
 2. publish the device in the VM's XenStore dir: data/blockbroker/NAME/dev ("MAJOR:MINOR") and
    data/blockbroker/NAME/diskseq (decimal), which dom0 re-reads when a person approves;
 3. send the request line to dom0's blockbroker.RequestExport+VM service with
    `qrexec-client-vm dom0 blockbroker.RequestExport+VM` and print the one-line answer.

Without qrexec (tests, the host dev stack), `--bridge-command CMD` (or
$BLOCKBROKER_BRIDGE_COMMAND) runs CMD with the line on stdin and the environment qrexec
would give the service: QREXEC_REMOTE_DOMAIN=--as-domain, QREXEC_SERVICE_ARGUMENT=VM; and
`--xenstore-prefix /local/domain/N/` publishes under that absolute path (as dom0 would see a
VM's own relative writes). Exit status: 0 ok, 4 denied, 1 any other error, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE = "blockbroker.RequestExport"
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
DOMAIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
DESC_UNSAFE = re.compile(r"[^A-Za-z0-9._,:+@/-]")
MAX_DESC = 64
SECTOR = 512
ANSWER_LIMIT = 1024
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED = 0, 1, 2, 4


class RequestError(Exception):
    pass


@dataclass(frozen=True)
class LocalDevice:
    name: str
    major: int
    minor: int
    diskseq: int
    size: int
    read_only: bool
    description: str

    def line(self, read_write: bool) -> str:
        fields = [
            f"name={self.name}",
            f"major={self.major}",
            f"minor={self.minor}",
            f"diskseq={self.diskseq}",
            f"size={self.size}",
            f"ro={int(self.read_only)}",
            f"mode={'rw' if read_write else 'ro'}",
        ]
        if self.description:
            fields.append(f"desc={self.description}")
        return " ".join(fields) + "\n"


def device_name(text: str) -> str:
    name = text.removeprefix("/dev/")
    if not NAME_RE.fullmatch(name):
        raise RequestError(f"{text!r} is not a kernel block device name (loop0, sda1, xvdi)")
    return name


def safe_description(text: str) -> str:
    return DESC_UNSAFE.sub("_", text)[:MAX_DESC]


def read_device(name: str, sysfs_root: str = "/sys", description: str | None = None) -> LocalDevice:
    base = Path(sysfs_root) / "class" / "block" / name
    try:
        major, _, minor = (base / "dev").read_text().strip().partition(":")
        diskseq_text = (base / "diskseq").read_text().strip()
        sectors = int((base / "size").read_text().strip())
        read_only = (base / "ro").read_text().strip() == "1"
    except FileNotFoundError as e:
        raise RequestError(
            f"{name}: {e.filename} is missing (no such device, or a kernel without diskseq; "
            "Linux 5.15+ is needed)"
        ) from None
    except (OSError, ValueError) as e:
        raise RequestError(f"{name}: cannot read its sysfs attributes: {e}") from None
    if description is None:
        description = ""
        backing = base / "loop" / "backing_file"
        if backing.exists():
            description = os.path.basename(backing.read_text().strip())
    return LocalDevice(
        name=name,
        major=int(major),
        minor=int(minor),
        diskseq=int(diskseq_text),
        size=sectors * SECTOR,
        read_only=read_only,
        description=safe_description(description),
    )


def publish(device: LocalDevice, prefix: str, env: dict[str, str]) -> None:
    """Write data/blockbroker/NAME/{dev,diskseq} (relative: the VM's own dir)."""
    base = f"{prefix}data/blockbroker/{device.name}"
    cmd = [
        "xenstore-write",
        f"{base}/dev",
        f"{device.major}:{device.minor}",
        f"{base}/diskseq",
        str(device.diskseq),
    ]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RequestError("xenstore-write is not installed (xen-utils / qubes-utils)") from None
    if result.returncode != 0:
        raise RequestError(f"publishing {base} failed: {result.stderr.strip()[:200]}")


def send(line: str, target: str, args: argparse.Namespace, env: dict[str, str]) -> str:
    bridge = args.bridge_command or env.get("BLOCKBROKER_BRIDGE_COMMAND")
    if bridge:
        if not args.as_domain:
            raise RequestError("--bridge-command needs --as-domain (QREXEC_REMOTE_DOMAIN)")
        cmd = shlex.split(bridge)
        env = {**env, "QREXEC_REMOTE_DOMAIN": args.as_domain, "QREXEC_SERVICE_ARGUMENT": target}
    else:
        cmd = ["qrexec-client-vm", "dom0", f"{SERVICE}+{target}"]
    try:
        result = subprocess.run(cmd, input=line.encode(), env=env, capture_output=True, check=False)
    except FileNotFoundError:
        raise RequestError(
            f"{cmd[0]} is not installed (not in a Qubes VM? see --bridge-command)"
        ) from None
    answer = result.stdout[:ANSWER_LIMIT].decode("ascii", "replace").strip().splitlines()
    if not answer:
        raise RequestError(f"no answer from {cmd[0]} (status {result.returncode})")
    return "".join(c if " " <= c <= "~" else "?" for c in answer[0])


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    try:
        name = device_name(args.device)
        if not DOMAIN_RE.fullmatch(args.to):
            raise RequestError(f"{args.to!r} is not a VM name")
        device = read_device(name, args.sysfs_root, args.description)
        if device.read_only and args.read_write:
            raise RequestError(f"{name} is read-only here; it can only be exported read-only")
        if args.publish:
            publish(device, args.xenstore_prefix, env)
        answer = send(device.line(args.read_write), args.to, args, env)
    except RequestError as e:
        print(f"blockbroker: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(answer)
    if answer.startswith("ok "):
        return EXIT_OK
    return EXIT_DENIED if answer.startswith("denied") else EXIT_ERROR


def register(sub: Any) -> None:
    """`blockbroker request-export`; runs without policyd's bus (sets `policy_handler`, the
    CLI's hook for commands that need no bus connection)."""
    p = sub.add_parser(
        "request-export",
        help="(in a VM) ask dom0 to export one of this VM's block devices to another VM",
    )
    p.add_argument("device", metavar="DEVICE", help="kernel name or /dev/NAME (loop0, sda1)")
    p.add_argument("--to", required=True, metavar="VM", help="the VM that should see the disk")
    p.add_argument("--rw", dest="read_write", action="store_true", help="ask for read-write")
    p.add_argument("--description", default=None, help="shown to the approver (sanitized)")
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    p.add_argument(
        "--no-publish",
        dest="publish",
        action="store_false",
        help="do not write data/blockbroker/NAME in XenStore (dom0 will refuse the request)",
    )
    p.add_argument(
        "--xenstore-prefix",
        default="",
        help="prefix for the published nodes (default: relative, the VM's own dir)",
    )
    p.add_argument(
        "--bridge-command",
        default=None,
        help="run this instead of qrexec-client-vm (tests; $BLOCKBROKER_BRIDGE_COMMAND)",
    )
    p.add_argument("--as-domain", default=None, help="QREXEC_REMOTE_DOMAIN for --bridge-command")
    p.set_defaults(policy_handler=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blockbroker")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["request-export", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.policy_handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
