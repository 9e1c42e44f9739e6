"""@tag:NAME rules in policyd: tags come from the tags file given by --tags-file, edits take
effect without a restart, and a missing tags file makes @tag rules deny (fail closed).

Runs as root with real daemons; policyd runs as user blockbroker, so the tags file lives in a
directory that user can read (pytest's own tmp dirs are 0700).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.names import EXPORT_IFACE
from harness.stack import Stack, StackConfig
from reqlab import audit_lines, call

pytestmark = [pytest.mark.root, pytest.mark.daemon]

POLICY = """# tags test policy
export  *  dom0  @tag:trusted  allow  mode=rw
export  *  dom0  *             deny
*       *  *     *             deny
"""


@pytest.fixture(scope="module")
def tags_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="blockbroker-tags-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory, tags_dir: Path) -> StackConfig:
    policy = tmp_path_factory.mktemp("policy")
    (policy / "50-tags.policy").write_text(POLICY)
    return StackConfig(
        domains={"work": 1, "other": 2},
        policy_dir=policy,
        policyd_args=["--tags-file", str(tags_dir / "tags")],
    )


def write_tags(path: Path, text: str) -> None:
    tmp = path.with_name(".tags.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def export(stack: Stack, image: Path, domain: str) -> dict[str, object]:
    return call(stack, "Export", "ssa{sv}", [str(image), domain, {}])


def detach(stack: Stack, export_path: str) -> None:
    out = call(stack, "Detach", path=export_path, iface=EXPORT_IFACE)
    assert out["error"] is None, out


def nothing_exported(stack: Stack) -> bool:
    base = "/local/domain/0/backend/vbd"
    fronts = stack.xs_ls(base) if stack.xs_exists(base) else []
    return not any(stack.xs_ls(f"{base}/{fe}") for fe in fronts) and stack.leaked_loops() == []


def test_tag_rules_follow_the_tags_file(stack: Stack, tags_dir: Path) -> None:
    tags = tags_dir / "tags"
    image = stack.make_image("tags.img")
    write_tags(tags, "# domain tags\nwork trusted\n")
    allowed = export(stack, image, "work")
    assert allowed["error"] is None, allowed
    denied = export(stack, image, "other")
    assert denied["error"] == "PolicyDenied", denied
    assert "50-tags.policy:3" in str(denied["message"])
    detach(stack, str(allowed["body"][0]))  # type: ignore[index]
    assert nothing_exported(stack)

    write_tags(tags, "other trusted\n")  # no restart: the next decision reads the new file
    assert export(stack, image, "work")["error"] == "PolicyDenied"
    moved = export(stack, image, "other")
    assert moved["error"] is None, moved
    detach(stack, str(moved["body"][0]))  # type: ignore[index]
    assert nothing_exported(stack)


def test_missing_tags_file_denies_tag_rules(stack: Stack, tags_dir: Path) -> None:
    (tags_dir / "tags").unlink(missing_ok=True)
    image = stack.make_image("tags-missing.img")
    out = export(stack, image, "work")
    assert out["error"] == "PolicyDenied", out
    assert nothing_exported(stack)
    assert any("result=deny" in line for line in audit_lines(stack))
