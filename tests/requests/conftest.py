"""Export-request tests use the host stack with real polkitd and a test export policy.

polkit rules: user nobody may approve, user daemon may not (a rule says no), user bin has no
rule (the action's default auth_admin applies, and there is no agent to ask), user games may
approve only requests for sys-usb's loop5 (policyd passes the request's details to polkit).
For export/detach by a non-root admin: nobody may, daemon may not, bin has no rule.
Root is never the approving subject: polkit authorizes uid 0 always.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.fixtures import stack, stack_factory  # noqa: F401
from harness.stack import StackConfig

RULES = """
polkit.addRule(function(action, subject) {
    if (action.id == "org.qubes.blockbroker.approve") {
        if (subject.user == "nobody") return polkit.Result.YES;
        if (subject.user == "daemon") return polkit.Result.NO;
        // policyd passes the request's details: a rule may look at them
        if (subject.user == "games")
            return action.lookup("device") == "loop5" && action.lookup("source") == "sys-usb"
                ? polkit.Result.YES : polkit.Result.NO;
    }
    if (["org.qubes.blockbroker.export", "org.qubes.blockbroker.detach"]
            .indexOf(action.id) >= 0) {
        if (subject.user == "nobody") return polkit.Result.YES;
        if (subject.user == "daemon") return polkit.Result.NO;
    }
});
"""

# Line numbers matter: tests expect rule locations 50-test.policy:2 and :3.
POLICY = """# blockbroker export policy for tests/requests
request-export  *       sys-net   *          deny
request-export  *       sys-usb   untrusted  allow  mode=ro
request-export  loop*   sys-usb   work       ask
request-export  *       @anyvm    @anyvm     ask
export          *       dom0      @anyvm     allow  mode=rw
attach          *       dom0      @anyvm     allow  mode=rw
*               *       *         *          deny
"""


@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    rules = tmp_path_factory.mktemp("polkit-rules")
    (rules / "50-blockbroker-test.rules").write_text(RULES)
    policy = tmp_path_factory.mktemp("policy")
    (policy / "50-test.policy").write_text(POLICY)
    return StackConfig(
        domains={"work": 1, "untrusted": 2, "sys-usb": 5, "sys-net": 6},
        polkit_rules=rules,
        policy_dir=policy,
        policyd_args=["--request-expiry", "300"],
    )


@pytest.fixture
def loop_dir(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o755)
    yield tmp_path
