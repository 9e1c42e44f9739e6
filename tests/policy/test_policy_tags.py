"""Tags file provider: parsing, errors with file:line, reload on change, fail closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyd.policy import Action, FileTagProvider, Policy, Request, TagLookupError
from policyd.policy.tags import parse_tags


def test_parse_tags_union_and_comments() -> None:
    data = b"# domain tags\nwork trusted storage  # comment\n\nwork  backup\nsys-usb\tusb\n"
    tags, errors = parse_tags(data, "tags")
    assert errors == []
    assert tags == {
        "work": frozenset({"trusted", "storage", "backup"}),
        "sys-usb": frozenset({"usb"}),
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"work", "too few fields"),
        (b"-work tag", "invalid domain name"),
        (b"work ta/g", "invalid tag"),
        (b"work t\xffg", "not valid UTF-8"),
    ],
)
def test_tags_errors_carry_location(line: bytes, message: str) -> None:
    tags, errors = parse_tags(b"ok tag\n" + line + b"\n", "/etc/blockbroker/tags")
    assert tags == {"ok": frozenset({"tag"})}
    assert len(errors) == 1
    assert errors[0].location == "/etc/blockbroker/tags:2" and message in errors[0].msg


def test_file_provider_reloads_and_fails_closed(tmp_path: Path) -> None:
    tags_file = tmp_path / "tags"
    provider = FileTagProvider(tags_file)
    with pytest.raises(TagLookupError):
        provider("work")  # missing file: no silent "untagged"
    tags_file.write_text("work trusted\n")
    assert provider("work") == frozenset({"trusted"})
    assert provider("other") == frozenset()
    tags_file.write_text("work trusted extra\n")
    assert provider("work") == frozenset({"trusted", "extra"})
    tags_file.write_text("work tr/usted\n")
    with pytest.raises(TagLookupError, match=r"tags:1"):
        provider("work")
    assert [e.location for e in provider.errors()] == [f"{tags_file}:1"]


def test_policy_with_file_tags(tmp_path: Path) -> None:
    tags_file = tmp_path / "tags"
    tags_file.write_text("sys-usb usb-source\nwork usb-target\n")
    text = "request-export * @tag:usb-source @tag:usb-target allow mode=ro\n"
    policy = Policy.from_string(text, tags=FileTagProvider(tags_file))
    ok = Request("request-export", "sdb", "sys-usb", "work", "ro")
    assert policy.evaluate(ok).action is Action.ALLOW
    assert policy.evaluate(Request("request-export", "sdb", "sys-usb", "vault", "ro")).action is (
        Action.DENY
    )
    tags_file.write_text("sys-usb usb-source\nwork usb-target\nbroken line/\n")
    decision = policy.evaluate(ok)
    assert decision.action is Action.DENY and "tag lookup failed" in decision.reason


def test_same_size_edit_with_same_mtime_is_seen(tmp_path: Path) -> None:
    tags_file = tmp_path / "tags"
    tags_file.write_text("work aaa\n")
    provider = FileTagProvider(tags_file)
    assert provider("work") == frozenset({"aaa"})
    st = tags_file.stat()
    tags_file.write_text("work bbb\n")
    os.utime(tags_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert provider("work") == frozenset({"bbb"})
