"""The files shipped in policy/: the default policy says what its comments say, and the polkit
actions file is well-formed and grants what the design asks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from policyd.policy import Action, Policy, Request

POLICY_DIR = Path(__file__).resolve().parents[2] / "policy"
DEFAULT_POLICY = POLICY_DIR / "policy.d" / "50-default.policy"


@pytest.fixture(scope="module")
def default_policy() -> Policy:
    policy = Policy.load_dir(DEFAULT_POLICY.parent)
    assert policy.error is None
    assert policy.files == (str(DEFAULT_POLICY),)
    return policy


@pytest.mark.parametrize(
    ("request_fields", "action"),
    [
        (("attach", "loop0", "dom0", "work", "rw"), Action.ALLOW),
        (
            ("attach", "file:/var/lib/qubes/appvms/work/private.img", "dom0", "work", "rw"),
            Action.ALLOW,
        ),
        (("export", "sdb", "dom0", "work", "ro"), Action.ALLOW),
        (("export", "file:/home/user/disk.img", "dom0", "work", "rw"), Action.ALLOW),
        (("request-export", "loop0", "sys-usb", "work", "rw"), Action.ASK),
        (("request-export", "sda", "work", "vault", "ro"), Action.ASK),
        (("request-export", "sda", "sys-usb", "dom0", "ro"), Action.DENY),
        (("attach", "loop0", "sys-usb", "work", "rw"), Action.DENY),
        (("export", "loop0", "sys-usb", "work", "rw"), Action.DENY),
        (("attach", "loop0", "dom0", "dom0", "rw"), Action.DENY),
        (("export", "loop0", "dom0", "dom0", "ro"), Action.DENY),
    ],
)
def test_default_policy_decisions(
    default_policy: Policy, request_fields: tuple[str, ...], action: Action
) -> None:
    decision = default_policy.evaluate(Request(*request_fields))
    assert decision.action is action, decision.explain()


def test_default_policy_ask_has_no_default_target(default_policy: Policy) -> None:
    decision = default_policy.evaluate(Request("request-export", "sdb", "sys-usb", "work", "ro"))
    assert decision.params.default_target is None


def test_default_policy_ends_with_explicit_deny(default_policy: Policy) -> None:
    last = default_policy.rules[-1]
    assert last.text == "* * * * deny"
    decision = default_policy.evaluate(Request("export", "loop0", "sys-net", "work", "ro"))
    assert decision.rule == last


POLKIT_FILE = POLICY_DIR / "org.qubes.blockbroker.policy"
EXPECTED_POLKIT = {
    "org.qubes.blockbroker.list": "yes",
    "org.qubes.blockbroker.export": "auth_admin_keep",
    "org.qubes.blockbroker.detach": "auth_admin_keep",
    "org.qubes.blockbroker.approve": "auth_admin",
    "org.qubes.blockbroker.attach": "no",
    "org.qubes.blockbroker.request-export": "no",
}


def test_polkit_actions_file() -> None:
    root = ET.parse(POLKIT_FILE).getroot()  # raises on malformed XML
    assert root.tag == "policyconfig"
    found: dict[str, str] = {}
    for action in root.findall("action"):
        action_id = action.get("id")
        assert action_id is not None
        assert action.findtext("description") and action.findtext("message")
        defaults = action.find("defaults")
        assert defaults is not None
        values = {child.tag: (child.text or "").strip() for child in defaults}
        assert set(values) == {"allow_any", "allow_inactive", "allow_active"}
        # one value for every kind of session: remote/inactive callers get no easier path
        assert len(set(values.values())) == 1, action_id
        found[action_id] = values["allow_any"]
    assert found == EXPECTED_POLKIT


def test_polkit_doctype_is_polkits() -> None:
    head = POLKIT_FILE.read_text().splitlines()[:3]
    assert head[0] == '<?xml version="1.0" encoding="UTF-8"?>'
    assert "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN" in " ".join(head)
