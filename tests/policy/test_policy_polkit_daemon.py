"""The real polkitd loads policy/org.qubes.blockbroker.policy: pkaction lists every action with
the implicit authorizations the design asks for. Needs root and real daemons (dbus, polkitd)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.fixtures import stack_factory  # noqa: F401
from harness.stack import Stack, StackConfig

EXPECTED = {
    "org.qubes.blockbroker.list": "yes",
    "org.qubes.blockbroker.export": "auth_admin_keep",
    "org.qubes.blockbroker.detach": "auth_admin_keep",
    "org.qubes.blockbroker.approve": "auth_admin",
    "org.qubes.blockbroker.attach": "no",
    "org.qubes.blockbroker.request-export": "no",
}


@pytest.mark.daemon
def test_pkaction_reads_the_actions_file(
    stack_factory: Callable[[StackConfig], Stack],  # noqa: F811
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    stack = stack_factory(StackConfig(broker=False, policyd=False, polkit_rules=rules))
    listed = subprocess.run(
        ["pkaction"], env=stack.env(), capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(a for a in listed if a.startswith("org.qubes.blockbroker.")) == sorted(EXPECTED)
    for action, implicit in EXPECTED.items():
        verbose = subprocess.run(
            ["pkaction", "--verbose", "--action-id", action],
            env=stack.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for kind in ("any", "inactive", "active"):
            assert f"implicit {kind}:" in verbose
            line = next(x for x in verbose.splitlines() if f"implicit {kind}:" in x)
            assert line.split(":", 1)[1].strip() == implicit, verbose
