"""Evaluation: first match wins, no match denies, syntax errors deny from their line on,
@anyvm/@adminvm/@tag/names match what the docs say, invalid requests and failing tag
providers deny."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.policy import (
    Action,
    Mode,
    Policy,
    Request,
    StaticTagProvider,
    TagLookupError,
    device_for_path,
)

TAGS = StaticTagProvider({"work": ["trusted"], "sys-usb": ["usb"], "dom0": ["admin"]})


def decide(policy_text: str, *request: str, mode: str = "rw") -> tuple[str, int | None, str]:
    policy = Policy.from_string(policy_text, "p.policy", tags=TAGS)
    decision = policy.evaluate(Request(*request, mode=mode))  # type: ignore[misc]
    lineno = decision.rule.lineno if decision.rule is not None else None
    return decision.action.value, lineno, decision.reason


def test_no_rules_denies() -> None:
    action, lineno, reason = decide("", "export", "loop0", "dom0", "work")
    assert (action, lineno, reason) == ("deny", None, "no rule matched: deny")


def test_first_match_wins() -> None:
    text = "export loop0 dom0 work deny\nexport loop* dom0 work allow\nexport * dom0 work ask\n"
    assert decide(text, "export", "loop0", "dom0", "work")[:2] == ("deny", 1)
    assert decide(text, "export", "loop1", "dom0", "work")[:2] == ("allow", 2)
    assert decide(text, "export", "sda", "dom0", "work")[:2] == ("ask", 3)
    assert decide(text, "export", "sda", "dom0", "personal")[:2] == ("deny", None)


@pytest.mark.parametrize(
    ("spec", "domain", "matches"),
    [
        ("@anyvm", "work", True),
        ("@anyvm", "dom0", False),
        ("@adminvm", "dom0", True),
        ("@adminvm", "work", False),
        ("dom0", "dom0", True),
        ("*", "dom0", True),
        ("*", "work", True),
        ("work", "work", True),
        ("work", "work2", False),
        ("@tag:trusted", "work", True),
        ("@tag:trusted", "personal", False),
        ("@tag:admin", "dom0", True),
    ],
)
def test_source_specs(spec: str, domain: str, matches: bool) -> None:
    action = decide(f"export * {spec} work allow", "export", "loop0", domain, "work")[0]
    assert action == ("allow" if matches else "deny")


@pytest.mark.parametrize(
    ("spec", "domain", "matches"),
    [("@anyvm", "work", True), ("@anyvm", "dom0", False), ("@tag:usb", "sys-usb", True)],
)
def test_target_specs(spec: str, domain: str, matches: bool) -> None:
    action = decide(f"export * dom0 {spec} allow", "export", "loop0", "dom0", domain)[0]
    assert action == ("allow" if matches else "deny")


@pytest.mark.parametrize(
    ("pattern", "device", "matches"),
    [
        ("*", "loop0", True),
        ("*", "file:/var/x.img", True),
        ("loop*", "loop12", True),
        ("loop*", "xloop1", False),
        ("sda", "sda1", False),
        ("file:/var/lib/qubes/*", "file:/var/lib/qubes/appvms/work/private.img", True),
        ("file:/var/lib/qubes/*", "file:/var/lib/qubesX/a.img", False),
        ("file:/var/lib/qubes/*", "loop0", False),
        ("file:/srv/a.img", "file:/srv/a.img", True),
        ("file:/srv/a.img", "file:/srv/a.img2", False),
    ],
)
def test_device_patterns(pattern: str, device: str, matches: bool) -> None:
    action = decide(f"export {pattern} dom0 work allow", "export", device, "dom0", "work")[0]
    assert action == ("allow" if matches else "deny")


def test_operation_star_and_specific() -> None:
    text = "request-export * @anyvm @anyvm ask\n* * dom0 @anyvm allow\n"
    assert decide(text, "request-export", "sda", "sys-usb", "work")[:2] == ("ask", 1)
    assert decide(text, "attach", "loop0", "dom0", "work")[:2] == ("allow", 2)
    assert decide(text, "export", "loop0", "dom0", "work")[:2] == ("allow", 2)


def test_mode_cap_denies_rw_and_allows_ro() -> None:
    text = "export * dom0 work allow mode=ro\n"
    action, lineno, reason = decide(text, "export", "loop0", "dom0", "work", mode="rw")
    assert (action, lineno) == ("deny", 1) and "at most mode=ro" in reason
    assert decide(text, "export", "loop0", "dom0", "work", mode="ro")[0] == "allow"
    assert decide("export * dom0 work allow\n", "export", "l0", "dom0", "work")[0] == "allow"


def test_ask_via_star_operation_is_denied_for_attach() -> None:
    action, lineno, reason = decide("* * dom0 @anyvm ask\n", "attach", "loop0", "dom0", "work")
    assert (action, lineno) == ("deny", 1) and "ask is not possible for attach" in reason


def test_request_export_into_dom0_is_always_denied() -> None:
    action, lineno, reason = decide("* * * * allow\n", "request-export", "sda", "sys-usb", "dom0")
    assert (action, lineno) == ("deny", None) and "never exported to dom0" in reason


def test_params_and_location_in_decision() -> None:
    policy = Policy.from_string("\n\nrequest-export sd* sys-usb @anyvm ask default_target=work\n")
    decision = policy.evaluate(Request("request-export", "sdb", "sys-usb", "vault", "ro"))
    assert decision.action is Action.ASK and not decision.allowed
    assert decision.location == "<string>:3"
    assert decision.params.default_target == "work" and decision.params.mode is None
    assert decision.params.as_dict() == {"default_target": "work"}


def test_syntax_error_mid_file_denies_from_there_on(tmp_path: Path) -> None:
    (tmp_path / "10-first.policy").write_text("export loop0 dom0 work allow\n")
    (tmp_path / "20-broken.policy").write_text(
        "export loop1 dom0 work allow\nexport loop2 dom0 work allaw\nexport loop3 dom0 work allow\n"
    )
    (tmp_path / "30-later.policy").write_text("export * dom0 work allow\n")
    policy = Policy.load_dir(tmp_path)
    broken = f"{tmp_path}/20-broken.policy:2"
    assert policy.error is not None and policy.error.location == broken

    def check(device: str) -> tuple[Action, str | None]:
        decision = policy.evaluate(Request("export", device, "dom0", "work"))
        return decision.action, decision.location

    assert check("loop0") == (Action.ALLOW, f"{tmp_path}/10-first.policy:1")
    assert check("loop1") == (Action.ALLOW, f"{tmp_path}/20-broken.policy:1")
    assert check("loop2") == (Action.DENY, broken)
    assert check("loop3") == (Action.DENY, broken)  # after the error in the same file
    assert check("sda") == (Action.DENY, broken)  # would be allowed by 30-later.policy
    reason = policy.evaluate(Request("export", "sda", "dom0", "work")).reason
    assert "unknown action 'allaw'" in reason and broken in reason


def test_load_dir_reads_only_policy_files_in_lexical_order(tmp_path: Path) -> None:
    (tmp_path / "b.policy").write_text("export * dom0 work deny\n")
    (tmp_path / "a.policy").write_text("export * dom0 work allow\n")
    (tmp_path / "0.policy.rpmnew").write_text("export * dom0 work bogus\n")
    (tmp_path / ".0.policy").write_text("export * dom0 work bogus\n")
    (tmp_path / "README").write_text("not a policy\n")
    policy = Policy.load_dir(tmp_path)
    assert policy.error is None
    assert policy.files == (str(tmp_path / "a.policy"), str(tmp_path / "b.policy"))
    assert policy.evaluate(Request("export", "loop0", "dom0", "work")).allowed


def test_missing_dir_denies_everything_and_names_it(tmp_path: Path) -> None:
    policy = Policy.load_dir(tmp_path / "nope")
    decision = policy.evaluate(Request("attach", "loop0", "dom0", "work"))
    assert decision.action is Action.DENY and decision.location == str(tmp_path / "nope")


def test_unreadable_file_denies_from_there_on(tmp_path: Path) -> None:
    (tmp_path / "10.policy").write_text("export loop0 dom0 work allow\n")
    (tmp_path / "20.policy").mkdir()  # a directory named like a policy file: cannot be read
    (tmp_path / "30.policy").write_text("export * dom0 work allow\n")
    policy = Policy.load_dir(tmp_path)
    assert policy.error is not None and policy.error.filepath == str(tmp_path / "20.policy")
    assert policy.evaluate(Request("export", "loop0", "dom0", "work")).allowed
    assert not policy.evaluate(Request("export", "loop1", "dom0", "work")).allowed


@pytest.mark.parametrize(
    "request_fields",
    [
        ("detach", "loop0", "dom0", "work", "rw"),
        ("export", "/dev/loop0", "dom0", "work", "rw"),
        ("export", "loop0", "dom 0", "work", "rw"),
        ("export", "loop0", "dom0", "@anyvm", "rw"),
        ("export", "loop0", "dom0", "*", "rw"),
        ("export", "file:/a/../etc/shadow", "dom0", "work", "rw"),
        ("export", "loop0", "dom0", "work", "RW"),
        ("request-export", "file:/home/user/x.img", "sys-usb", "work", "ro"),
    ],
)
def test_invalid_requests_deny(request_fields: tuple[str, ...]) -> None:
    policy = Policy.from_string("* * * * allow\n")
    decision = policy.evaluate(Request(*request_fields))
    assert decision.action is Action.DENY and decision.rule is None
    assert decision.reason.startswith("invalid request: ")


def test_non_string_request_fields_deny() -> None:
    policy = Policy.from_string("* * * * allow\n")
    assert not policy.evaluate(Request(None, "loop0", "dom0", "work")).allowed  # type: ignore[arg-type]


def test_mode_enum_is_accepted() -> None:
    policy = Policy.from_string("export * dom0 work allow mode=ro\n")
    assert policy.evaluate(Request("export", "loop0", "dom0", "work", Mode.RO)).allowed


def test_failing_tag_provider_denies_at_the_tag_rule() -> None:
    def broken(domain: str) -> frozenset[str]:
        raise TagLookupError("xenstore gone")

    text = "export * dom0 @tag:bad deny\nexport * dom0 @anyvm allow\nexport * dom0 work allow\n"
    policy = Policy.from_string(text, tags=broken)
    decision = policy.evaluate(Request("export", "loop0", "dom0", "work"))
    assert decision.action is Action.DENY and decision.location == "<string>:1"
    assert "xenstore gone" in decision.reason


def test_tag_provider_is_not_called_without_tag_rules() -> None:
    calls: list[str] = []

    def provider(domain: str) -> frozenset[str]:
        calls.append(domain)
        return frozenset({"t"})

    policy = Policy.from_string("export * dom0 @anyvm allow\n", tags=provider)
    assert policy.evaluate(Request("export", "loop0", "dom0", "work")).allowed
    assert calls == []
    policy = Policy.from_string(
        "export * @tag:x @tag:x deny\nexport * @tag:t @tag:t allow\n", tags=provider
    )
    assert policy.evaluate(Request("export", "loop0", "dom0", "work")).allowed
    assert calls == ["dom0", "work"]  # dom0 asked once: lookups are cached per evaluation


def test_explain_text() -> None:
    policy = Policy.from_string("export loop* dom0 work allow mode=rw\n", "x.policy")
    text = policy.evaluate(Request("export", "loop3", "dom0", "work")).explain()
    assert text.splitlines() == [
        "decision: allow",
        "rule: x.policy:1: export loop* dom0 work allow mode=rw",
        "reason: allowed by rule",
    ]


@pytest.mark.parametrize(
    ("path", "device"),
    [("/dev/loop0", "loop0"), ("/dev/sda1", "sda1"), ("/srv/a.img", "file:/srv/a.img")],
)
def test_device_for_path(path: str, device: str) -> None:
    assert device_for_path(path) == device


@pytest.mark.parametrize("path", ["/dev/mapper/x", "/dev/../etc/shadow", "relative", "/a/./b"])
def test_device_for_path_rejects(path: str) -> None:
    with pytest.raises(ValueError):
        device_for_path(path)
