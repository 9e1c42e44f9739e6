"""`blockbroker`: the command line for exporting disks to Xen guests through policyd.

Runs as the calling user; talks to policyd over the D-Bus system bus (DBUS_SYSTEM_BUS_ADDRESS is
honoured). It has no privilege of its own: policyd and the bus policy decide.

    blockbroker export PATH --to DOMAIN [--ro|--rw] [--devid N] [--direct-io] [--dm-uuid UUID]
                       [--fd] [--json]
    blockbroker detach EXPORT            (object path, short id n, or backend path)
    blockbroker list [--json]
    blockbroker status [--json]
    blockbroker requests [--json]        (VMs asking to export one of their devices)
    blockbroker approve|deny REQUEST     (object path or short id n)
    blockbroker watch [--json]           (prints changes as they happen; Ctrl-C ends)
    blockbroker policy lint|explain ...  (reads the policy files; see client/policycmd.py)

Exit statuses: 0 ok; 1 the service answered with an error (its D-Bus name is printed);
2 usage error; 3 the service (or its broker) is not reachable; 4 access denied (by policyd,
the bus policy, or the export policy). Errors go to stderr as
`blockbroker: <D-Bus error name>: <message>`; errors from the bus or the client itself add a
hint in parentheses (policyd's own messages already say what to do). `policy` and
`request-export` (client/request_export.py, run inside a VM) work without policyd's bus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from client import output, policycmd, request_export
from client.api import (
    DEFAULT_TIMEOUT,
    AsyncClient,
    export_path,
    is_backend_path,
    request_path,
)
from client.errors import EXIT_OK, EXIT_USAGE, BlockBrokerError, UsageError

Handler = Callable[[AsyncClient, argparse.Namespace], Coroutine[Any, Any, int]]


async def cmd_export(bb: AsyncClient, args: argparse.Namespace) -> int:
    source: str | int = args.path
    opened = -1
    try:
        if args.fd:
            # UDisks2-style: the file is opened with the caller's own rights, policyd gets the fd.
            flags = os.O_RDONLY if args.read_only else os.O_RDWR
            try:
                opened = os.open(args.path, flags | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as e:
                print(f"blockbroker: cannot open {args.path}: {e.strerror}", file=sys.stderr)
                return EXIT_USAGE
            source = opened
        info = await bb.export(
            source,
            to=args.to,
            read_only=args.read_only,
            devid=args.devid,
            direct_io=args.direct_io,
            dm_uuid=args.dm_uuid,
        )
    finally:
        if opened >= 0:
            os.close(opened)
    output.print_export_detail(info, args.json, sys.stdout)
    return EXIT_OK


async def cmd_detach(bb: AsyncClient, args: argparse.Namespace) -> int:
    await bb.detach(args.export)
    return EXIT_OK


async def cmd_list(bb: AsyncClient, args: argparse.Namespace) -> int:
    output.print_exports(await bb.list_exports(), args.json, sys.stdout)
    return EXIT_OK


async def cmd_status(bb: AsyncClient, args: argparse.Namespace) -> int:
    output.print_status(await bb.status(), args.json, sys.stdout)
    return EXIT_OK


async def cmd_requests(bb: AsyncClient, args: argparse.Namespace) -> int:
    output.print_requests(await bb.list_requests(), args.json, sys.stdout)
    return EXIT_OK


async def cmd_approve(bb: AsyncClient, args: argparse.Namespace) -> int:
    await bb.approve(args.request)
    return EXIT_OK


async def cmd_deny(bb: AsyncClient, args: argparse.Namespace) -> int:
    await bb.deny(args.request)
    return EXIT_OK


async def cmd_watch(bb: AsyncClient, args: argparse.Namespace) -> int:
    sub_events = bb.watch()
    async for event in sub_events:
        output.print_event(event, args.json, sys.stdout)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockbroker",
        description="Export files and block devices to Xen guests through blockbroker's policyd.",
        epilog="Exit status: 0 ok, 1 service error, 2 usage, 3 service unreachable, "
        "4 access denied. See docs/client.md.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export", help="export a file or block device to a domain")
    p.add_argument("path", metavar="PATH", help="image file or block device")
    p.add_argument("--to", required=True, metavar="DOMAIN", help="frontend domain (name)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--ro", dest="read_only", action="store_true", default=True, help="read-only (the default)"
    )
    mode.add_argument("--rw", dest="read_only", action="store_false", help="read-write")
    p.add_argument(
        "--devid", type=_devid, metavar="N", help="virtual device id (default: next free)"
    )
    p.add_argument(
        "--direct-io", action="store_true", default=None, help="loop device uses O_DIRECT"
    )
    p.add_argument(
        "--dm-uuid",
        metavar="UUID",
        help="refuse unless PATH is the device-mapper device with this uuid "
        "(LVM: LVM-<vg uuid><lv uuid>, `lvs -o vg_uuid,lv_uuid`, dashes removed)",
    )
    p.add_argument(
        "--fd",
        action="store_true",
        help="open PATH here with your own rights and pass the fd (ExportFd)",
    )
    p.add_argument("--json", action="store_true", help="print the export as one JSON object")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("detach", help="detach an export")
    p.add_argument(
        "export",
        type=_detach_target,
        metavar="EXPORT",
        help="object path, short id (n of .../export/n), or backend path",
    )
    p.set_defaults(handler=cmd_detach)

    p = sub.add_parser("list", help="list exports")
    p.add_argument("--json", action="store_true", help="one JSON object per export, one per line")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("status", help="show the service's status")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("requests", help="list VMs' requests to export their devices")
    p.add_argument("--json", action="store_true", help="one JSON object per request, one per line")
    p.set_defaults(handler=cmd_requests)

    for name, handler, text in (
        ("approve", cmd_approve, "approve a pending export request (pinned to its diskseq)"),
        ("deny", cmd_deny, "deny a pending export request"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "request", type=_request_target, metavar="REQUEST", help="object path or short id"
        )
        p.set_defaults(handler=handler)

    p = sub.add_parser("watch", help="print changes as they happen (Ctrl-C ends)")
    p.add_argument("--json", action="store_true", help="one JSON object per event, one per line")
    p.set_defaults(handler=cmd_watch)

    _register_policy_commands(sub)
    request_export.register(sub)  # in a VM: no policyd bus; runs via policy_handler
    return parser


def _register_policy_commands(sub: Any) -> None:
    """`blockbroker policy lint|explain`, owned by the policy engine (client/policycmd.py).

    Its parsers set `policy_handler(args) -> int`, which `main` runs without a bus connection: the
    policy tools read the policy files themselves and work while policyd is down.
    """
    policycmd.register(sub)


def _detach_target(text: str) -> str:
    """An export's object path, short id, or backend path; checked before connecting."""
    if is_backend_path(text):
        return text
    try:
        return export_path(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _request_target(text: str) -> str:
    try:
        return request_path(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _devid(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0..4294967295)")
    return value


async def run(args: argparse.Namespace) -> int:
    handler: Handler = args.handler
    bb = await AsyncClient.connect(timeout=args.timeout)
    try:
        return await handler(bb, args)
    finally:
        await bb.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "policy_handler", None) is not None:  # `policy ...`: no bus needed
        status: int = args.policy_handler(args)
        return status
    try:
        return asyncio.run(run(args))
    except BlockBrokerError as e:
        print(f"blockbroker: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
