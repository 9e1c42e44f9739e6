"""Unit: CLI argument handling and the unreachable-service exit status, without a stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from client import cli
from client.errors import EXIT_UNREACHABLE, EXIT_USAGE


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["export", "/x"],  # --to missing
        ["export", "/x", "--to", "work", "--ro", "--rw"],
        ["export", "/x", "--to", "work", "--devid", "abc"],
        ["export", "/x", "--to", "work", "--devid", "4294967296"],
        ["detach"],
        ["detach", "not-an-export"],
        ["detach", "/org/qubes/BlockBroker1"],
        ["list", "extra"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "usage: blockbroker" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = cli.build_parser().parse_args(["export", "a.img", "--to", "work", "--devid", "0x10"])
    assert args.read_only is True
    assert args.devid == 16
    assert cli.build_parser().parse_args(["export", "a", "--to", "w", "--rw"]).read_only is False


def test_unreachable_bus_exits_3(tmp_path: Path) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-such-socket")
    result = run_cli("list", env=env)
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("blockbroker: cannot connect to unix:path=")
    assert "is policyd running?" in result.stderr


def test_policy_commands_are_wired_in(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["policy", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "lint" in out
    assert "explain" in out


def test_policy_lint_runs_without_a_bus(tmp_path: Path) -> None:
    (tmp_path / "50-test.policy").write_text("this is not a rule\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-such-socket")
    result = run_cli("policy", "lint", str(tmp_path), env=env)
    assert result.returncode == 1
    assert "50-test.policy:1:" in result.stdout + result.stderr
