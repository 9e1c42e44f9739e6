"""blockbroker-policyd: command line, start-up and shutdown.

Unprivileged: runs as user blockbroker with no capabilities; needs the bus, the XenStore socket
and the broker's socket. Ready = it owns org.qubes.BlockBroker1 on the bus.

    blockbroker-policyd --broker-socket PATH [--xenstore-path PATH] [--sysfs-root DIR]
                        [--bus-address ADDR] [--backend-domid 0]
                        [--policy-dir /etc/blockbroker/policy.d] [--request-expiry 300]
                        [--pre-attach-claim 60] [--block-socket PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import sys
from pathlib import Path

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from policyd import logfmt, validate
from policyd.brokerclient import AsyncBrokerClient
from policyd.bus.blocksocket import BlockSocket, BlockSocketError
from policyd.bus.connection import PolicydBus
from policyd.bus.objects import BusObjects
from policyd.bus.service import Service, StartupError
from policyd.exports.brokercalls import BrokerCalls
from policyd.exports.custody import DEFAULT_STORE_MAX, Custody
from policyd.exports.exporter import DEFAULT_CLAIM_S, Exporter
from policyd.exports.fdstore import FdStore, ListenFdsError, take_listen_fds
from policyd.exports.reconcile import StartupAbort, reconcile, resolve_kept
from policyd.exports.registry import Registry
from policyd.exports.sources import Sources
from policyd.names import BUS_NAME
from policyd.policy import DEFAULT_POLICY_DIR, FileTagProvider
from policyd.policygate import PolicyGate
from policyd.requests.lifecycle import DEFAULT_EXPIRY_S, MAX_EXPIRY_S, Requests
from policyd.xenstore.store import XenStore

DEFAULT_XENSTORE = "/run/xenstored/socket"
DEFAULT_TAGS_FILE = Path("/etc/blockbroker/tags")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="blockbroker-policyd", description=__doc__.split("\n")[0])
    p.add_argument("--broker-socket", required=True, help="the broker's SOCK_SEQPACKET socket")
    p.add_argument(
        "--xenstore-path",
        default=os.environ.get("XENSTORED_PATH", DEFAULT_XENSTORE),
        help="xenstored's unix socket (default: $XENSTORED_PATH or %(default)s)",
    )
    p.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    p.add_argument("--bus-address", default=None, help="D-Bus address (default: the system bus)")
    p.add_argument("--backend-domid", default="0", help="the backend domain's id (default 0)")
    p.add_argument(
        "--policy-dir",
        default=str(DEFAULT_POLICY_DIR),
        help="the export policy's directory (default %(default)s; see docs/policy.md)",
    )
    p.add_argument(
        "--tags-file",
        default=str(DEFAULT_TAGS_FILE),
        help="domain tags for @tag:NAME policy rules (default %(default)s; a missing or "
        "malformed file makes every @tag rule deny; see docs/policy.md)",
    )
    p.add_argument(
        "--fd-store-max",
        type=int,
        default=DEFAULT_STORE_MAX,
        help="the unit's FileDescriptorStoreMax= (default %(default)s): policyd refuses new "
        "devices before its fd store would overflow",
    )
    p.add_argument(
        "--request-expiry",
        type=int,
        default=DEFAULT_EXPIRY_S,
        help="seconds a VM's export request waits for a person (default %(default)s)",
    )
    p.add_argument(
        "--pre-attach-claim",
        type=float,
        default=DEFAULT_CLAIM_S,
        help="seconds a pre-attached disk (its Attach started when libxl wrote the backend, "
        "before the hotplug script asks) waits for the script before it is released "
        "(default %(default)s; 0: no pre-attach)",
    )
    p.add_argument(
        "--block-socket",
        default=None,
        help="serve the libxl block script's Attach and Detach (uid 0 only) on this "
        "SOCK_SEQPACKET socket too, beside D-Bus (default: off; see docs/architecture.md)",
    )
    args = p.parse_args(argv)
    if args.block_socket is not None and not os.path.isabs(args.block_socket):
        p.error("--block-socket must be an absolute path")
    if not 0 <= args.pre_attach_claim <= 3600:
        p.error("--pre-attach-claim must be 0-3600 seconds")
    if not 1 <= args.request_expiry <= MAX_EXPIRY_S:
        p.error(f"--request-expiry must be 1-{MAX_EXPIRY_S} seconds")
    try:
        args.backend_domid = validate.domid(args.backend_domid)
    except Exception:
        p.error("--backend-domid must be a domain id (0-32751)")
    return args


def version() -> str:
    try:
        return importlib.metadata.version("blockbroker")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Policyd:
    """The daemon's objects, built and wired here and nowhere else."""

    def __init__(self, bus: MessageBus, args: argparse.Namespace, store: FdStore) -> None:
        self.objects = BusObjects(bus, version())
        self.xenstore = XenStore(
            args.xenstore_path, on_connection_changed=self.objects.xenstore_connected
        )
        self.broker = BrokerCalls(
            AsyncBrokerClient(args.broker_socket),
            on_connected_changed=self.objects.broker_connected,
        )
        self.registry = Registry()
        self.gate = PolicyGate(
            args.policy_dir, self.xenstore.domain_name, FileTagProvider(args.tags_file)
        )
        self.exporter = Exporter(
            xenstore=self.xenstore,
            broker=self.broker,
            registry=self.registry,
            sources=Sources(self.registry, self.broker),
            policy_check=self.gate.check_path,
            listener=self.objects,
            custody=Custody(store, args.fd_store_max),
            backend_domid=args.backend_domid,
            sysfs_root=args.sysfs_root,
            claim_s=args.pre_attach_claim or None,
            resolver=resolve_kept,
        )
        self.requests = Requests(
            exporter=self.exporter,
            xenstore=self.xenstore,
            gate=self.gate,
            listener=self.objects,
            home=args.backend_domid,
            expiry_s=args.request_expiry,
        )
        self.service = Service(bus, exporter=self.exporter, requests=self.requests)

    def start(self) -> None:
        self.objects.start()
        self.service.start()

    def stop(self) -> None:
        self.requests.shutdown()  # pending requests end audited (withdrawn, "policyd stopping")


async def run(args: argparse.Namespace) -> int:
    try:
        stored = take_listen_fds()  # systemd's fd store: what policyd held before a restart
    except ListenFdsError as e:
        logfmt.error("ignoring a malformed LISTEN_FDS environment", error=e)
        stored = []
    bus = await PolicydBus(
        bus_address=args.bus_address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True
    ).connect()
    daemon = Policyd(bus, args, FdStore.from_environ())
    daemon.start()
    await daemon.exporter.probe()
    # Before the name is taken, so no call sees a half-rebuilt registry. A failure (XenStore or
    # the broker unavailable) ends policyd: the fd store keeps the fds for the next start.
    await reconcile(daemon.exporter, stored)
    await daemon.exporter.watch_backends()
    await daemon.requests.load_counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply != RequestNameReply.PRIMARY_OWNER:
        logfmt.error("cannot own the bus name", name=BUS_NAME, reply=reply)
        return 1
    # Once D-Bus is served: until then a block script finds no socket and calls over D-Bus,
    # where its call waits for the name. A socket that cannot be made is logged, not fatal:
    # D-Bus serves the script all the same.
    block = None
    if args.block_socket is not None:
        block = BlockSocket(Path(args.block_socket), daemon.service)
        try:
            block.start()
        except (BlockSocketError, OSError) as e:
            logfmt.error("block socket not served; the block script will use D-Bus", error=e)
            block = None
    logfmt.info(
        "ready",
        name=BUS_NAME,
        uid=os.getuid(),
        broker=args.broker_socket,
        xenstore=args.xenstore_path,
        sysfs=args.sysfs_root,
        backend_domid=args.backend_domid,
        block_socket="" if block is None else args.block_socket,
    )
    disconnected = loop.create_task(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    logfmt.info("stopping", exports=len(daemon.registry), bus_lost=disconnected.done())
    for task in (disconnected, stopped):
        task.cancel()
    if block is not None:
        await block.stop()
    daemon.stop()
    bus.disconnect()
    daemon.exporter.shutdown()
    return 0 if stopped.done() and not disconnected.done() else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logfmt.setup()
    try:
        return asyncio.run(run(args))
    except StartupError as e:
        logfmt.error("refusing to start", error=e)
        return 2
    except StartupAbort as e:
        logfmt.error(
            "start-up reconciliation could not finish; exiting (the fd store keeps the fds)",
            error=e,
        )
        return 1
    except Exception as e:
        logfmt.error("start-up failed", error=f"{type(e).__name__}: {e}", exc=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
