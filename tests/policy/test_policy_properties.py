"""Property tests: random text never makes the parser raise anything but the documented
PolicySyntaxError (always with a file:line), and evaluation never raises on any request."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.policy import Action, Policy, PolicySyntaxError, Request, ValidatingParser
from policyd.policy.lint import covers
from policyd.policy.parser import parse_rule
from policyd.policy.tokens import validate_device, validate_domain_name

TOKENS = [
    "attach", "export", "request-export", "*", "loop*", "sd*", "loop0", "file:/srv/*",
    "file:/srv/a.img", "dom0", "@adminvm", "@anyvm", "@tag:t", "sys-usb", "work", "allow",
    "deny", "ask", "mode=ro", "mode=rw", "default_target=work", "#", "=", "@", "\t", " ",
]  # fmt: skip

# Lines built from policy-like tokens reach deep into the grammar; raw bytes test the reader.
policy_like_line = st.lists(st.sampled_from(TOKENS), max_size=9).map(" ".join)
policy_like_text = st.lists(policy_like_line | st.text(max_size=40), max_size=12).map("\n".join)


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_random_bytes_only_give_located_syntax_errors(data: bytes) -> None:
    parser = ValidatingParser()
    parser.parse_bytes(data, "r.policy")
    for error in parser.errors:
        assert isinstance(error, PolicySyntaxError)
        assert error.filepath == "r.policy" and error.lineno is not None and error.lineno >= 1
    assert all(rule.lineno >= 1 for rule in parser.rules)


@given(policy_like_line)
@settings(max_examples=500)
def test_parse_rule_raises_only_syntax_errors(line: str) -> None:
    try:
        parse_rule(line, "l.policy", 3)
    except PolicySyntaxError as err:
        assert err.location == "l.policy:3"


@given(policy_like_text)
@settings(max_examples=300)
def test_from_string_never_raises(text: str) -> None:
    policy = Policy.from_string(text, "s.policy")
    if policy.error is not None:
        assert policy.error.filepath == "s.policy" and policy.error.lineno is not None


domain_like = st.sampled_from(["dom0", "work", "sys-usb", "@anyvm", "*", "", "a" * 40]) | st.text(
    max_size=40
)
device_like = st.sampled_from(
    ["loop0", "sda", "file:/srv/a.img", "file:/srv/../etc", "file:", "*"]
) | st.text(max_size=60)
request_strategy = st.builds(
    Request,
    operation=st.sampled_from(["attach", "export", "request-export", "*", ""])
    | st.text(max_size=20),
    device=device_like,
    source=domain_like,
    target=domain_like,
    mode=st.sampled_from(["ro", "rw", "", "RO"]) | st.text(max_size=5),
)
POLICY = Policy.from_string(
    "\n".join(
        [
            "export file:/srv/* dom0 @tag:t allow mode=ro",
            "request-export sd* @anyvm @anyvm ask default_target=work",
            "attach loop* dom0 @anyvm allow",
            "* * @tag:x * deny",
            "* * * * allow",
        ]
    ),
    tags=lambda domain: frozenset({"t"}) if domain == "work" else frozenset(),
)


@given(request_strategy)
@settings(max_examples=500)
def test_evaluate_never_raises(request: Request) -> None:
    decision = POLICY.evaluate(request)
    assert isinstance(decision.action, Action)
    assert decision.reason
    if decision.action is not Action.DENY:
        # only validated requests get past deny
        assert decision.rule is not None
        assert validate_device(request.device) == request.device
        assert validate_domain_name(request.target) == request.target


@given(request_strategy, policy_like_text)
@settings(max_examples=300)
def test_evaluate_random_policy_never_raises(request: Request, text: str) -> None:
    decision = Policy.from_string(text).evaluate(request)
    assert isinstance(decision.action, Action)


# The linter's shadowing check must never claim a rule is dead when some request reaches it.
RULE_OPS = st.sampled_from(["*", "attach", "export", "request-export"])
RULE_DEVICES = st.sampled_from(
    ["*", "loop*", "loop1*", "loop1", "sd*", "sda", "file:/*", "file:/srv/*", "file:/srv/a.img"]
)
RULE_DOMAINS = st.sampled_from(["*", "@anyvm", "@adminvm", "dom0", "work", "vault", "@tag:t"])
rule_line = st.tuples(RULE_OPS, RULE_DEVICES, RULE_DOMAINS, RULE_DOMAINS).map(
    lambda fields: " ".join(fields) + " allow"
)
matching_request = st.builds(
    Request,
    operation=st.sampled_from(["attach", "export"]),
    device=st.sampled_from(["loop1", "loop12", "loop2", "sda", "sdb", "file:/srv/a.img",
                            "file:/srv/b/c.img", "file:/tmp/x"]),
    source=st.sampled_from(["dom0", "work", "vault", "other"]),
    target=st.sampled_from(["dom0", "work", "vault", "other"]),
    mode=st.just("ro"),
)  # fmt: skip


@given(rule_line, rule_line, matching_request)
@settings(max_examples=1000)
def test_shadowing_check_is_sound(first: str, second: str, request: Request) -> None:
    def tags(domain: str) -> frozenset[str]:
        return frozenset({"t"}) if domain in ("work", "dom0") else frozenset()

    earlier, later = (parse_rule(line, "p", 1) for line in (first, second))
    assert earlier is not None and later is not None
    if not covers(earlier, later):
        return
    only_later = Policy([later], tags=tags).evaluate(request)
    both = Policy([earlier, later], tags=tags).evaluate(request)
    if only_later.rule is not None:  # the later rule matches this request...
        assert both.rule is earlier  # ...so the earlier one must match it too
