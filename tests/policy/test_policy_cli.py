"""`blockbroker policy lint` and `explain`: output lines and exit codes, in-process through
`main(argv)`, through `register()` on a parent parser, and once as a real process."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from client import policycmd

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "policy" / "policy.d"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = policycmd.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "10-a.policy").write_text("export loop* dom0 work allow mode=ro\n")
    (tmp_path / "20-b.policy").write_text("# nothing\nrequest-export * @anyvm @anyvm ask\n")
    return tmp_path


def test_lint_clean_dir(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["lint", "--policy-dir", str(policy_dir)], capsys) == (0, "", "")


def test_lint_shipped_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["lint", str(DEFAULT_DIR)], capsys) == (0, "", "")


def test_lint_reports_every_error(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = policy_dir / "30-bad.policy"
    bad.write_bytes(b"export * dom0 work allow\nexport * dom0 work alow\n\xff\nexport *\n")
    code, out, err = run(["lint", "--policy-dir", str(policy_dir)], capsys)
    assert code == 1 and err == ""
    assert out.splitlines() == [
        f"{bad}:2: unknown action 'alow' (expected allow, deny or ask)",
        f"{bad}:3: not valid UTF-8 (byte 1 of the line)",
        f"{bad}:4: too few fields (2; expected OPERATION DEVICE SOURCE TARGET ACTION"
        " [PARAM=VALUE ...])",
    ]


def test_lint_named_files_and_missing_file(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = str(policy_dir / "10-a.policy")
    assert run(["lint", good], capsys) == (0, "", "")
    missing = str(policy_dir / "nope.policy")
    code, out, _ = run(["lint", good, missing], capsys)
    assert code == 1 and out.startswith(f"{missing}: cannot read: ")


def test_lint_tags_file(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tags = policy_dir / "tags"
    tags.write_text("work ok\nwork b@d\n")
    code, out, _ = run(["lint", "--policy-dir", str(policy_dir), "--tags-file", str(tags)], capsys)
    assert code == 1 and out.startswith(f"{tags}:2: invalid tag 'b@d'")


def test_explain_allow(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "export", "loop3", "dom0", "work", "--mode", "ro"]
    code, out, err = run([*argv, "--policy-dir", str(policy_dir)], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "decision: allow",
        f"rule: {policy_dir}/10-a.policy:1: export loop* dom0 work allow mode=ro",
        "reason: allowed by rule",
    ]


def test_explain_mode_cap(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "export", "loop3", "dom0", "work", "--policy-dir", str(policy_dir)]
    code, out, _ = run(argv, capsys)
    assert code == 4 and "at most mode=ro" in out and "10-a.policy:1" in out


def test_explain_ask_and_no_match(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--policy-dir", str(policy_dir)]
    code, out, _ = run(["explain", "request-export", "sdb", "sys-usb", "work", *base], capsys)
    assert code == 5 and out.splitlines()[0] == "decision: ask" and "20-b.policy:2" in out
    code, out, _ = run(["explain", "attach", "sdb", "dom0", "work", *base], capsys)
    assert code == 4
    assert out.splitlines() == ["decision: deny", "reason: no rule matched: deny"]


def test_explain_broken_policy_warns_and_names_error(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (policy_dir / "05-broken.policy").write_text("export * dom0 work allow extra\n")
    argv = ["explain", "export", "loop3", "dom0", "work", "--policy-dir", str(policy_dir)]
    code, out, err = run(argv, capsys)
    location = f"{policy_dir}/05-broken.policy:1"
    assert code == 4 and f"at: {location}" in out
    assert err.startswith(f"warning: policy is broken from here on: {location}: ")


def test_explain_invalid_request(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "export", "/dev/sda", "dom0", "work", "--policy-dir", str(policy_dir)]
    code, out, _ = run(argv, capsys)
    assert code == 4 and "reason: invalid request: invalid block device name" in out


def test_explain_with_tags_file(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "00-tags.policy").write_text("export * dom0 @tag:blocked deny\n")
    tags = policy_dir / "tags"
    tags.write_text("work blocked\n")
    argv = ["explain", "export", "loop3", "dom0", "work", "--mode", "ro"]
    argv += ["--policy-dir", str(policy_dir), "--tags-file", str(tags)]
    code, out, _ = run(argv, capsys)
    assert code == 4 and "00-tags.policy:1" in out


def test_register_on_a_parent_parser(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="blockbroker")
    policycmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["policy", "lint", "--policy-dir", str(policy_dir)])
    assert args.policy_handler(args) == 0
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["policy", "explain", "export"])
    assert exc.value.code == 2


def test_runs_as_a_process(policy_dir: Path) -> None:
    (policy_dir / "30.policy").write_text("bogus\n")
    proc = subprocess.run(
        [sys.executable, "-m", "client.policycmd", "lint", str(policy_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert (
        proc.stdout == f"{policy_dir}/30.policy:1: too few fields (1; expected OPERATION"
        " DEVICE SOURCE TARGET ACTION [PARAM=VALUE ...])\n"
    )


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ("export * dom0 @anyvm allow", "export loop0 dom0 work deny", True),
        ("* loop* * * deny", "attach loop1 dom0 @anyvm allow", True),
        ("export loop* dom0 work allow", "export lo* dom0 work deny", False),
        ("export file:/srv/* dom0 work allow", "export file:/srv/a/b.img dom0 work deny", True),
        ("export file:/srv/* dom0 work allow", "export loop0 dom0 work deny", False),
        ("export * dom0 @anyvm allow", "export * dom0 dom0 deny", False),
        ("export * @tag:a work allow", "export * @tag:a work deny", True),
        ("export * @tag:a work allow", "export * sys-usb work deny", False),
        ("attach * dom0 work allow", "export * dom0 work allow", False),
        ("export * dom0 work allow mode=ro", "export * dom0 work allow mode=rw", True),
    ],
)
def test_lint_warns_about_shadowed_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], earlier: str, later: str, shadowed: bool
) -> None:
    (tmp_path / "10.policy").write_text(f"{earlier}\n")
    (tmp_path / "20.policy").write_text(f"# c\n{later}\n")
    code, out, _ = run(["lint", str(tmp_path)], capsys)
    assert code == 0
    expected = (
        [
            f"{tmp_path}/20.policy:2: warning: rule never matches: every request it covers is"
            f" decided earlier by {tmp_path}/10.policy:1"
        ]
        if shadowed
        else []
    )
    assert out.splitlines() == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["request-export", "sdb", "sys-usb", "work", "--mode", "ro"],
        ["export", "sdb", "sys-net", "work"],
    ],
)
def test_docs_explain_examples_match_the_default_policy(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(["explain", *argv, "--policy-dir", str(DEFAULT_DIR)], capsys)
    docs = (DEFAULT_DIR.parents[1] / "docs" / "policy.md").read_text()
    example = out.replace(str(DEFAULT_DIR), "/etc/blockbroker/policy.d")
    assert "\n".join("    " + line for line in example.splitlines()) in docs


def test_blockbroker_command_runs_policy_subcommands(policy_dir: Path) -> None:
    blockbroker = Path(sys.executable).parent / "blockbroker"
    argv = [str(blockbroker), "policy", "explain", "request-export", "sdb", "sys-usb", "work"]
    proc = subprocess.run(
        [*argv, "--policy-dir", str(policy_dir)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.splitlines()[:2] == [
        "decision: ask",
        f"rule: {policy_dir}/20-b.policy:2: request-export * @anyvm @anyvm ask",
    ]
