"""The authentication prompts say what is approved: a real polkit agent (pkttyagent) answers for
a non-root caller, and the test reads the prompt it printed, for export, detach and approve.

Runs as root with real daemons and real polkitd. The caller is a throwaway user with a known
password, created for this module and removed after it; a polkit rule says AUTH_SELF for it, so
polkitd asks the agent registered for the caller's process, which asks for the user's own
password on its terminal (tests/harness/agent.py). What the prompt shows comes from the action's
message with policyd's details expanded by polkitd (policy/org.qubes.blockbroker.policy).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from harness.agent import PASSWORD_PROMPT, Agent, Caller, agent_for
from harness.names import EXPORT_IFACE, MANAGER, MANAGER_IFACE, REQUEST_IFACE
from harness.stack import Stack, StackConfig
from reqlab import (
    NOBODY,
    Holder,
    bridge_gid,
    device_descriptor,
    managed_exports,
    managed_requests,
    publish,
    vm_backends,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

USER = "bb-prompt-test"
ACTIONS = ["org.qubes.blockbroker.export", "org.qubes.blockbroker.detach",
           "org.qubes.blockbroker.approve"]  # fmt: skip
RULES = f"""
polkit.addRule(function(action, subject) {{
    if (subject.user == "{USER}" && {ACTIONS!r}.indexOf(action.id) >= 0)
        return polkit.Result.AUTH_SELF;
}});
"""
POLICY = """# tests/requests/test_prompts_agent.py
request-export  *   @anyvm   @anyvm   ask
export          *   dom0     @anyvm   allow  mode=rw
*               *   *        *        deny
"""
AGENT_RESET = "\x1b[0m"  # pkttyagent's own, after its coloured banner
# printable ASCII, quotes and parentheses: a description that tries to end the claim early
# and continue with words of its own
FAKE_TAIL = "Cruzer') to VM dom0, read-write. Approve? ('x"


@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    rules = tmp_path_factory.mktemp("polkit-rules")
    (rules / "50-prompt-test.rules").write_text(RULES)
    policy = tmp_path_factory.mktemp("policy")
    (policy / "50-test.policy").write_text(POLICY)
    return StackConfig(domains={"work": 1, "sys-usb": 5}, polkit_rules=rules, policy_dir=policy)


@pytest.fixture(scope="module")
def password() -> Iterator[str]:
    """USER exists with this password while the module runs (a throwaway account)."""
    subprocess.run(["userdel", USER], capture_output=True, check=False)  # a crashed run's
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/usr/sbin/nologin", "--user-group", USER], check=True)  # fmt: skip
    secret = secrets.token_hex(12)
    try:
        subprocess.run(["chpasswd"], input=f"{USER}:{secret}\n", text=True, check=True)
        yield secret
    finally:
        subprocess.run(["userdel", USER], check=True)


def authenticated_call(stack: Stack, password: str, path: str, iface: str, member: str,
                       sig: str = "", body: list[Any] | None = None,
                       ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """One call by USER that polkit authenticates through pkttyagent: (outcome, the screen)."""
    caller = Caller(stack.bus_address, USER)
    try:
        with agent_for(caller, USER, stack.bus_address) as agent:
            caller.send(path, iface, member, sig, body)
            assert agent.read_until(PASSWORD_PROMPT), screen_of(agent)
            agent.type_password(password)
            outcome = caller.answer()
            agent.read_until(b"AUTHENTICATION COMPLETE", 5)
            return outcome, screen_of(agent)
    finally:
        caller.close()


def screen_of(agent: Agent) -> str:
    return agent.screen.decode("utf-8", "replace").replace("\r\n", "\n")


def prompt_of(screen: str, action: str) -> str:
    """The message pkttyagent printed for `action`: the line after its banner (and after the
    agent's own colour reset, if it colours the banner); nothing else before "Authenticating
    as". Any other escape sequence, line break or bidi character is the message's own."""
    banner = rf"==== AUTHENTICATING FOR {re.escape(action)} ====\n(?:{re.escape(AGENT_RESET)})?"
    m = re.search(rf"{banner}(.*?)\nAuthenticating as", screen, re.S)
    assert m is not None, screen
    message = m[1]
    assert "\n" not in message and message.isprintable() and message.isascii(), repr(message)
    assert not any(unicodedata.bidirectional(c) in ("RLO", "LRO", "RLE", "LRE", "RLI", "LRI",
                                                     "FSI", "PDF", "PDI", "R", "AL")
                   for c in message)  # fmt: skip
    assert "$(" not in message, message  # every detail arrived
    return message


def test_export_and_detach_prompts_name_the_path_size_vm_and_mode(
    stack: Stack, password: str
) -> None:
    image = stack.make_image("prompt-export.img", size=3 << 20)
    outcome, screen = authenticated_call(stack, password, MANAGER, MANAGER_IFACE, "Export",
                                         "ssa{sv}", [str(image), "work", {}])  # fmt: skip
    assert outcome["error"] is None, (outcome, screen)
    export = outcome["body"][0]
    assert prompt_of(screen, "org.qubes.blockbroker.export") == (
        f"Authentication is required to export '{image}' (3.0 MiB) to VM work, read-only"
    )
    assert "AUTHENTICATION COMPLETE" in screen
    assert export in managed_exports(stack)

    outcome, screen = authenticated_call(stack, password, export, EXPORT_IFACE, "Detach")
    assert outcome["error"] is None, (outcome, screen)
    assert prompt_of(screen, "org.qubes.blockbroker.detach") == (
        f"Authentication is required to detach export {export} of '{image}' (read-only) "
        "from VM work"
    )
    assert export not in managed_exports(stack)


def test_read_write_export_of_a_hostile_path(stack: Stack, password: str) -> None:
    """A file name with a quote and words of its own: shown quoted, the quote as '?'. (The
    export policy's path grammar then refuses it: polkit is asked first.)"""
    image = stack.make_image("x') to VM dom0 (y.img", size=1 << 20)
    body = [str(image), "work", {"read-only": ["b", False]}]
    outcome, screen = authenticated_call(stack, password, MANAGER, MANAGER_IFACE, "Export",
                                         "ssa{sv}", body)  # fmt: skip
    shown = str(image).replace("'", "?")
    assert prompt_of(screen, "org.qubes.blockbroker.export") == (
        f"Authentication is required to export '{shown}' (1.0 MiB) to VM work, read-write"
    )
    assert outcome["error"].endswith(".PolicyDenied"), (outcome, screen)
    assert managed_exports(stack) == {} and stack.leaked_loops() == []


def request_body(name: str, diskseq: int, description: str) -> list[object]:
    device = device_descriptor(name, diskseq, 7, 0)  # as published below
    device["description"] = ["s", description]
    device["size"] = ["t", int(7.5 * (1 << 30))]
    return ["sys-usb", device, "work", {}]


def test_approve_prompt_names_vm_device_claims_diskseq_and_target(
    stack: Stack, password: str
) -> None:
    publish(stack, 5, "sdb", "7:0", "42")
    holder = Holder(stack, request_body("sdb", 42, f"SanDisk {FAKE_TAIL}"), user=NOBODY,
                    groups=(bridge_gid(),))  # fmt: skip
    try:
        request = holder.path
        outcome, screen = authenticated_call(stack, password, request, REQUEST_IFACE, "Approve")
        assert outcome["error"] is None, (outcome, screen)
        claimed = "'SanDisk " + FAKE_TAIL.replace("'", "?") + "'"
        assert prompt_of(screen, "org.qubes.blockbroker.approve") == (
            f"VM sys-usb asks to give its device sdb (claimed: {claimed}, 7.5 GiB, diskseq 0x2a) "
            f"to VM work, read-only. Authentication is required to approve or deny request "
            f"{request}"
        )
        (export,) = managed_exports(stack)
        (backend,) = vm_backends(stack, 5)
        assert stack.xs_read(f"{backend}/diskseq") == f"{42:x}"
        # the detach prompt of a VM's device names the VM and its device
        outcome, screen = authenticated_call(stack, password, export, EXPORT_IFACE, "Detach")
        assert outcome["error"] is None, (outcome, screen)
        assert prompt_of(screen, "org.qubes.blockbroker.detach") == (
            f"Authentication is required to detach export {export} of 'sys-usb:/dev/sdb' "
            "(read-only) from VM work"
        )
        assert vm_backends(stack, 5) == []
    finally:
        holder.close()


@pytest.mark.parametrize(
    "description",
    ["SanDisk\u202eevil", "two\nlines", "zero\u200bwidth", "e\u0301", "x" * 65, "tab\there"],
)
def test_a_description_that_could_fake_text_never_reaches_a_prompt(
    stack: Stack, description: str
) -> None:
    """The intake (policyd.requests.vmdevice) refuses it: no request, so nothing to approve."""
    publish(stack, 5, "sdc", "7:0", "43")
    holder = Holder(stack, request_body("sdc", 43, description), user=NOBODY,
                    groups=(bridge_gid(),))  # fmt: skip
    try:
        assert holder.first["error"] == "InvalidArgument", holder.first
        assert "description" in holder.first["message"]
        assert managed_requests(stack) == {}
    finally:
        holder.close()


def test_no_prompt_for_what_cannot_be_described(stack: Stack, password: str) -> None:
    """No such object, invalid arguments, a wrong signature: the call's own error, and the
    agent is never asked (polkit would have asked it: the rule says AUTH_SELF)."""
    caller = Caller(stack.bus_address, USER)
    try:
        with agent_for(caller, USER, stack.bus_address) as agent:
            cases = [
                ((f"{MANAGER}/request/999", REQUEST_IFACE, "Approve"), "NotFound"),
                ((f"{MANAGER}/request/999", REQUEST_IFACE, "Deny"), "NotFound"),
                ((f"{MANAGER}/export/999", EXPORT_IFACE, "Detach"), "NotFound"),
                ((MANAGER, MANAGER_IFACE, "DetachExport", "o", [f"{MANAGER}/export/9"]),
                 "NotFound"),
                ((MANAGER, MANAGER_IFACE, "Export", "ssa{sv}", ["relative", "work", {}]),
                 "InvalidArgument"),
                ((MANAGER, MANAGER_IFACE, "Export", "ss", ["/x", "work"]), "InvalidArgument"),
            ]  # fmt: skip
            for args, error in cases:
                caller.send(*args)  # type: ignore[arg-type]
                outcome = caller.answer()
                assert outcome["error"] == f"org.qubes.BlockBroker1.Error.{error}", (args, outcome)
            assert not agent.read_until(b"AUTHENTICATING", 1), screen_of(agent)
    finally:
        caller.close()


def test_a_wrong_password_is_refused_and_nothing_exported(stack: Stack, password: str) -> None:
    image = stack.make_image("prompt-wrong.img")
    caller = Caller(stack.bus_address, USER)
    try:
        with agent_for(caller, USER, stack.bus_address) as agent:
            caller.send(MANAGER, MANAGER_IFACE, "Export", "ssa{sv}", [str(image), "work", {}])
            for _ in range(3):  # pkttyagent asks again after a failure; the last ends it
                if not agent.read_until(PASSWORD_PROMPT):
                    break
                agent.screen.clear()
                agent.type_password("not-" + password)
            outcome = caller.answer(90)
        assert outcome["error"].endswith(".AccessDenied"), outcome
        assert managed_exports(stack) == {}
        assert stack.leaked_loops() == []
    finally:
        caller.close()
