"""scripts/devstack: run a command against a private host stack, then tear it down and check.

Test harness, runs as root. Exit status: the command's own (128+N if it died of signal N);
97 if the stack did not start; 98 if teardown found a leak or a misbehaving daemon (the command's
own status is printed then).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import FrameType

from harness import ns
from harness.procs import StackError, log
from harness.stack import Stack, StackConfig
from harness.xenstore import FIXED_RUN_DIR

EXIT_STARTUP_FAILED = 97
EXIT_TEARDOWN_PROBLEM = 98


def parse_domain(text: str) -> tuple[str, int]:
    name, sep, domid = text.partition("=")
    if not sep or not name or not domid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=DOMID, got {text!r}")
    return name, int(domid)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="devstack",
        usage="devstack [options] -- CMD [ARGS...]",
        description="Run CMD against a private blockbroker host stack (oxenstored, system bus, "
        "broker, policyd, optionally polkitd), then tear it down and check for leaks.",
    )
    parser.add_argument(
        "--domain",
        action="append",
        type=parse_domain,
        default=[],
        metavar="NAME=DOMID",
        help="register a guest domain in XenStore (repeatable)",
    )
    parser.add_argument(
        "--allow-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="extra file root for the broker; loops backed by files here are leak-checked",
    )
    parser.add_argument("--no-policyd", action="store_true", help="do not start policyd")
    parser.add_argument(
        "--policy-dir",
        type=Path,
        metavar="DIR",
        help="export policy for policyd (copied into the stack; default: policy/policy.d)",
    )
    parser.add_argument(
        "--policyd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for policyd (repeatable), e.g. --policyd-arg=--request-expiry=5",
    )
    parser.add_argument("--no-broker", action="store_true", help="do not start the broker")
    parser.add_argument(
        "--polkit-rules",
        type=Path,
        metavar="DIR",
        help="start polkitd with these *.rules and the project's policy/*.policy actions",
    )
    parser.add_argument(
        "--sysfs-blkback",
        action="store_true",
        help="give policyd a stand-in blkback sysfs (STACKDIR/sysfs/bus/xen-backend/devices)",
    )
    parser.add_argument("--stack-dir", type=Path, metavar="DIR", help="use DIR (kept afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the stack dir after teardown")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run (after --)")
    args = parser.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        parser.error("no command given; use: devstack [options] -- CMD [ARGS...]")
    domids = [domid for _, domid in args.domain]
    if len(set(domids)) != len(domids):
        parser.error("each --domain needs its own DOMID")
    return args


def run_command(cmd: list[str], env: dict[str, str]) -> int:
    """Run CMD in the foreground; forward SIGTERM/SIGHUP to it. SIGINT does nothing here: Ctrl-C
    reaches CMD through the terminal, and devstack must live on to tear the stack down."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # signals that came before CMD existed

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    # Handlers go in before CMD starts, so no signal can find devstack undefended.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # A handler, not SIG_IGN: an ignored signal would stay ignored in CMD across exec.
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    try:
        try:
            child = subprocess.Popen(cmd, env=env)
        except OSError as e:
            log("command_failed", cmd=cmd[0], reason=e.strerror)
            return 127
        for signum in pending:
            child.send_signal(signum)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


class Terminated(BaseException):
    """SIGTERM or SIGHUP while the stack starts: stop what started, exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


def ignore(_signum: int, _frame: FrameType | None) -> None:
    """Teardown is bounded; a second SIGTERM must not cut it short."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("devstack: must run as root", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    extra = {"policy_dir": args.policy_dir} if args.policy_dir else {}
    config = StackConfig(
        **extra,
        domains=dict(args.domain),
        allow_roots=args.allow_root,
        broker=not args.no_broker,
        policyd=not args.no_policyd and not args.no_broker,
        polkit_rules=args.polkit_rules,
        policyd_args=args.policyd_arg,
        sysfs_blkback=args.sysfs_blkback,
        stack_dir=args.stack_dir,
        keep_stack_dir=args.keep,
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_terminated)
    # The command sees /run/xenstored/socket too (tools that ignore XENSTORED_PATH), in a mount
    # namespace of its own that dies with devstack.
    ns.enter_private_mount_namespace()
    try:
        stack = Stack(config)
        stack.start()  # stops what it started if anything goes wrong
    except Terminated as e:
        print(f"devstack: signal {e.signum} while the stack started", file=sys.stderr)
        return 128 + e.signum
    except StackError as e:
        print(f"devstack: stack did not start: {e}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    except Exception:
        traceback.print_exc()
        print("devstack: stack did not start (an error in the harness itself)", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    status = EXIT_STARTUP_FAILED
    try:
        FIXED_RUN_DIR.mkdir(parents=True, exist_ok=True)
        ns.bind_mount(stack.xenstored_run_dir, FIXED_RUN_DIR)
        status = run_command(args.cmd, stack.env())
        log("command_exited", status=status)
    except Terminated as e:
        status = 128 + e.signum
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, ignore)
        problems = stack.stop()
    if problems:
        print("devstack: teardown found problems:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        for name in ("policyd", "broker", "polkitd", "dbus", "oxenstored"):
            if stack.log_path(name).exists():
                print(f"--- last lines of {stack.log_path(name)} ---", file=sys.stderr)
                print(stack.log_tail(name, 15), file=sys.stderr)
        print(f"devstack: command exited with status {status}", file=sys.stderr)
        return EXIT_TEARDOWN_PROBLEM
    return status
