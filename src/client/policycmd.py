"""`blockbroker policy lint` and `blockbroker policy explain`: check and explain the policy.

Trust level: unprivileged, runs as the invoking admin; reads policy and tags files (trusted,
root-owned) directly, without policyd, so it works while the daemon is down.

    blockbroker policy lint [FILES|DIRS ...]          default: /etc/blockbroker/policy.d
    blockbroker policy explain OP DEVICE SOURCE TARGET [--mode ro|rw]
                                [--policy-dir DIR] [--tags-file FILE]

lint prints one `file:line: message` per error and exits 1 if there was any (0 otherwise);
rules that can never match (an earlier rule covers them) are printed as
`file:line: warning: ...` and do not change the exit status.
explain prints the decision, the deciding rule with its `file:line`, and the reason; it exits
0 for allow, 4 for deny (the `blockbroker` CLI's "access denied"), 5 for ask; 2 is a usage error.

`blockbroker` hooks this in with `register(subparsers)`; the parsers it adds set
`policy_handler=<callable(args) -> int>`, which the CLI runs without a bus connection.
`main(argv)` runs it standalone (`python -m client.policycmd`).

The policy engine (policyd.policy, through its public API only) is imported when a `policy`
command runs, not when the CLI loads: the rest of `blockbroker`, and `request-export` inside a
VM, run without the policyd package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policyd.policy import PolicySyntaxError, Shadowed

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_DENY = 4
EXIT_ASK = 5
_EXIT_FOR_ACTION = {"allow": EXIT_OK, "deny": EXIT_DENY, "ask": EXIT_ASK}  # by Action.value


def lint(
    paths: Sequence[str], tags_file: str | None = None
) -> tuple[list[PolicySyntaxError], list[Shadowed]]:
    """Every error in the given policy files (a directory means its *.policy files), and the
    rules that can never match (warnings), with the files taken in the order given."""
    from policyd.policy import (
        FileTagProvider,
        PolicySyntaxError,
        ValidatingParser,
        find_shadowed,
        list_policy_files,
    )

    parser = ValidatingParser()
    for name in paths:
        path = Path(name)
        if path.is_dir():
            try:
                files = list_policy_files(path)
            except PolicySyntaxError as err:
                parser.handle_error(err)
                continue
        else:
            files = [path]
        for file in files:
            parser.parse_file(file)
    errors: list[PolicySyntaxError] = list(parser.errors)
    if tags_file is not None:
        errors.extend(FileTagProvider(tags_file).errors())
    return errors, find_shadowed(parser.rules)


def _policy_dir(args: argparse.Namespace) -> str:
    """--policy-dir, or the engine's default (read here: the engine is loaded only to run)."""
    if args.policy_dir is not None:
        return str(args.policy_dir)
    from policyd.policy import DEFAULT_POLICY_DIR

    return str(DEFAULT_POLICY_DIR)


def run_lint(args: argparse.Namespace) -> int:
    paths: list[str] = args.files or [_policy_dir(args)]
    errors, warnings = lint(paths, args.tags_file)
    for error in errors:
        print(error)
    for warning in warnings:
        print(warning)
    return EXIT_ERRORS if errors else EXIT_OK


def run_explain(args: argparse.Namespace) -> int:
    from policyd.policy import FileTagProvider, Policy, Request, TagProvider, no_tags

    tags: TagProvider = no_tags if args.tags_file is None else FileTagProvider(args.tags_file)
    policy = Policy.load_dir(_policy_dir(args), tags)
    if policy.error is not None:
        print(f"warning: policy is broken from here on: {policy.error}", file=sys.stderr)
    request = Request(args.operation, args.device, args.source, args.target, args.mode)
    decision = policy.evaluate(request)
    print(decision.explain())
    return _EXIT_FOR_ACTION[decision.action.value]


def _add_subcommands(policy_parser: argparse.ArgumentParser) -> None:
    commands = policy_parser.add_subparsers(dest="policy_command", metavar="COMMAND")
    commands.required = True

    lint_parser = commands.add_parser(
        "lint", help="check policy files; print file:line: message per error"
    )
    lint_parser.add_argument(
        "files", nargs="*", metavar="FILE", help="policy files or directories (default: DIR)"
    )
    lint_parser.add_argument("--policy-dir", metavar="DIR")
    lint_parser.add_argument("--tags-file", metavar="FILE", help="also check this tags file")
    lint_parser.set_defaults(policy_handler=run_lint)

    explain_parser = commands.add_parser(
        "explain", help="show which rule decides a request, and why"
    )
    explain_parser.add_argument("operation", metavar="OP", help="attach | export | request-export")
    explain_parser.add_argument("device", metavar="DEVICE", help="e.g. loop0 or file:/path")
    explain_parser.add_argument("source", metavar="SOURCE", help="backend domain")
    explain_parser.add_argument("target", metavar="TARGET", help="frontend domain")
    explain_parser.add_argument("--mode", choices=("ro", "rw"), default="rw")
    explain_parser.add_argument("--policy-dir", metavar="DIR")
    explain_parser.add_argument("--tags-file", metavar="FILE")
    explain_parser.set_defaults(policy_handler=run_explain)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `policy lint` and `policy explain` to the `blockbroker` CLI."""
    policy_parser = subparsers.add_parser("policy", help="check and explain the export policy")
    _add_subcommands(policy_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockbroker policy", description="Check and explain the blockbroker export policy."
    )
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.policy_handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
