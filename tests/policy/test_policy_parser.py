"""Parser: valid rules parse into the right tokens; every malformed line is a PolicySyntaxError
naming file:line, and the engine denies from that line on."""

from __future__ import annotations

import pytest

from policyd.policy import (
    AccessDenied,
    Action,
    Mode,
    Policy,
    PolicySyntaxError,
    ValidatingParser,
)
from policyd.policy.parser import MAX_FILE_SIZE, MAX_LINE_LENGTH, parse_rule
from policyd.policy.tokens import DomainKind

GOOD = "request-export  sd*  sys-usb  @tag:work  ask  mode=ro default_target=work"


def errors_of(text: bytes, name: str = "t.policy") -> list[PolicySyntaxError]:
    parser = ValidatingParser()
    parser.parse_bytes(text, name)
    return parser.errors


def test_rule_fields_parse() -> None:
    rule = parse_rule(GOOD, "f.policy", 7)
    assert rule is not None
    assert rule.operation == "request-export"
    assert rule.device.prefix == "sd"
    assert rule.source.kind is DomainKind.NAME and rule.source.value == "sys-usb"
    assert rule.target.kind is DomainKind.TAG and rule.target.value == "work"
    assert rule.action is Action.ASK
    assert rule.params.mode is Mode.RO and rule.params.default_target == "work"
    assert rule.location == "f.policy:7"
    assert rule.text == "request-export sd* sys-usb @tag:work ask mode=ro default_target=work"


@pytest.mark.parametrize("line", ["", "   ", "# comment", "\t# indented comment"])
def test_blank_and_comment_lines_are_not_rules(line: str) -> None:
    assert parse_rule(line, "f", 1) is None


def test_trailing_comment_and_tabs() -> None:
    rule = parse_rule("attach\t*\tdom0\t@anyvm\tallow   # libxl", "f", 1)
    assert rule is not None and rule.text == "attach * dom0 @anyvm allow"


@pytest.mark.parametrize(
    ("token", "exact", "prefix"),
    [
        ("*", None, None),
        ("loop0", "loop0", None),
        ("loop*", None, "loop"),
        ("dm-3", "dm-3", None),
        ("file:/var/lib/img.raw", "file:/var/lib/img.raw", None),
        ("file:/var/lib/qubes/*", None, "file:/var/lib/qubes/"),
        ("file:/*", None, "file:/"),
    ],
)
def test_device_patterns(token: str, exact: str | None, prefix: str | None) -> None:
    rule = parse_rule(f"export {token} dom0 work allow", "f", 1)
    assert rule is not None
    assert (rule.device.exact, rule.device.prefix) == (exact, prefix)


@pytest.mark.parametrize(
    ("token", "kind"),
    [
        ("*", DomainKind.ANY),
        ("@anyvm", DomainKind.ANYVM),
        ("@adminvm", DomainKind.ADMINVM),
        ("dom0", DomainKind.ADMINVM),
        ("@tag:usb-ok", DomainKind.TAG),
        ("sys-usb", DomainKind.NAME),
        ("a.b_c-d", DomainKind.NAME),
    ],
)
def test_domain_specs(token: str, kind: DomainKind) -> None:
    rule = parse_rule(f"export * {token} work deny", "f", 1)
    assert rule is not None and rule.source.kind is kind


BAD_LINES = [
    ("export * dom0 work permit", "unknown action 'permit'"),
    ("detach * dom0 work allow", "unknown operation 'detach'"),
    ("export * dom0 work", "too few fields"),
    ("export", "too few fields"),
    ("export * dom0 work allow extra", "too many fields"),
    ("export * dom0 work allow mode=ro extra", "too many fields"),
    ("export * dom0 work allow size=1", "unknown parameter 'size'"),
    ("export * dom0 work allow MODE=ro", "invalid parameter name"),
    ("export * dom0 work allow mode=ro mode=ro", "duplicate parameter 'mode'"),
    ("export * dom0 work allow mode=rx", "invalid mode 'rx'"),
    ("export * dom0 work allow mode=", "invalid mode ''"),
    ("export * dom0 work deny mode=ro", "not allowed with action 'deny'"),
    ("export * dom0 work allow default_target=work", "not allowed with action 'allow'"),
    ("request-export * @anyvm @anyvm ask default_target=-x", "invalid default_target"),
    ("request-export * @anyvm @anyvm ask default_target=dom0", "cannot be dom0"),
    ("attach * dom0 @anyvm ask", "ask is not possible for attach"),
    ("export * dom0 wo$rk allow", "invalid domain name"),
    ("export * dom0 1work allow", "invalid domain name"),
    ("export * dom0 " + "a" * 32 + " allow", "invalid domain name"),
    ("export * dom0 wörk allow", "invalid domain name"),
    ("export * @anyvms work allow", "unknown domain keyword"),
    ("export * @tag: work allow", "invalid tag"),
    ("export * @tag:a/b work allow", "invalid tag"),
    ("export sd[a-z] dom0 work allow", "only '*' or a single trailing '*'"),
    ("export s*d dom0 work allow", "only '*' or a single trailing '*'"),
    ("export sd? dom0 work allow", "only '*' or a single trailing '*'"),
    ("export ** dom0 work allow", "only '*' or a single trailing '*'"),
    ("export SDA dom0 work allow", "invalid device pattern"),
    ("export ../x dom0 work allow", "invalid device pattern"),
    ("export file:relative dom0 work allow", "not absolute"),
    ("export file:/a/../etc/* dom0 work allow", "invalid file pattern"),
    ("export file:/a//b dom0 work allow", "invalid file pattern"),
    ("export file:/a/b* dom0 work allow", "'*' only as a whole last component"),
    ("export file:/a/*/b dom0 work allow", "'*' only as a whole last component"),
    ("export file:/*/b/* dom0 work allow", "'*' only as the last component"),
    ("export file:/a\\b dom0 work allow", "invalid file pattern"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_is_syntax_error_with_location(line: str, message: str) -> None:
    text = f"# header\nexport * dom0 other allow\n{line}\n".encode()
    errors = errors_of(text, "/etc/x/10-a.policy")
    assert len(errors) == 1
    err = errors[0]
    assert (err.filepath, err.lineno) == ("/etc/x/10-a.policy", 3)
    assert err.location == "/etc/x/10-a.policy:3"
    assert str(err).startswith("/etc/x/10-a.policy:3: ")
    assert message in err.msg
    assert isinstance(err, AccessDenied)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"export * dom0 w\xffork allow", "not valid UTF-8"),
        (b"export * dom0 work allow # \xc3\x28", "not valid UTF-8"),
        (b"export * dom0 work allow\r", "U+000D"),
        (b"export * dom0 work allow \x00", "U+0000"),
        ("export * dom0 work allow # \u202e".encode(), "U+202E"),
        (b"# " + b"x" * MAX_LINE_LENGTH, "line too long"),
    ],
)
def test_bad_bytes_are_syntax_errors_with_location(raw: bytes, message: str) -> None:
    errors = errors_of(b"export * dom0 a allow\n" + raw + b"\n")
    assert [(e.location, message in e.msg) for e in errors] == [("t.policy:2", True)]


def test_line_at_the_length_limit_is_fine() -> None:
    assert errors_of(b"#" + b"x" * (MAX_LINE_LENGTH - 1) + b"\n") == []


def test_oversized_file_is_an_error_at_the_crossing_line() -> None:
    line = b"# " + b"x" * 98 + b"\n"  # 101 bytes
    data = line * (MAX_FILE_SIZE // len(line) + 2)
    errors = errors_of(data)
    assert len(errors) == 1
    assert "larger than" in errors[0].msg
    assert errors[0].lineno == MAX_FILE_SIZE // len(line) + 1


def test_linter_reports_every_error_engine_stops_at_first() -> None:
    text = "export * dom0 a allow\nbogus\nexport * dom0 b allow\nexport * dom0 c nope\n"
    assert [e.lineno for e in errors_of(text.encode())] == [2, 4]
    policy = Policy.from_string(text, "s.policy")
    assert [r.lineno for r in policy.rules] == [1]
    assert policy.error is not None and policy.error.location == "s.policy:2"


def test_lone_surrogate_in_string_policy_is_a_syntax_error() -> None:
    policy = Policy.from_string("export * dom0 a allow\n# \udc80\n")
    assert policy.error is not None and policy.error.location == "<string>:2"
    assert "UTF-8" in policy.error.msg
