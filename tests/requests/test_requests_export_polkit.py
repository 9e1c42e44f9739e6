"""A non-root admin may Export and Detach when polkit says so (org.qubes.blockbroker.export and
.detach, auth_admin_keep by default); refused or unanswered, nothing is opened or written.

Runs as root with real daemons and real polkitd (rules in conftest.py: user nobody yes, user
daemon no, user bin no rule and no authentication agent). Root is never the subject here.
"""

from __future__ import annotations

import pytest
from harness.names import EXPORT_IFACE, PROPS_IFACE
from harness.stack import Stack
from reqlab import NOBODY, audit_lines, call

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def nothing_exported(stack: Stack) -> bool:
    base = "/local/domain/0/backend/vbd"
    fronts = stack.xs_ls(base) if stack.xs_exists(base) else []
    return not any(stack.xs_ls(f"{base}/{fe}") for fe in fronts) and stack.leaked_loops() == []


def test_polkit_admin_exports_and_detaches(stack: Stack) -> None:
    image = stack.make_image("polkit-admin.img")
    out = call(stack, "Export", "ssa{sv}", [str(image), "work", {}], user=NOBODY)
    assert out["error"] is None, out
    export_path = out["body"][0]
    backend = call(stack, "Get", "ss", [EXPORT_IFACE, "BackendPath"], path=export_path,
                   iface=PROPS_IFACE)["body"][0]  # fmt: skip
    assert stack.xs_exists(f"{backend}/physical-device")
    refused = call(stack, "Detach", path=export_path, iface=EXPORT_IFACE, user="daemon")
    assert refused["error"] == "AccessDenied", refused
    assert stack.xs_exists(f"{backend}/physical-device")  # still exported
    done = call(stack, "Detach", path=export_path, iface=EXPORT_IFACE, user=NOBODY)
    assert done["error"] is None, done
    assert nothing_exported(stack)


@pytest.mark.parametrize("user", ["daemon", "bin"])
def test_polkit_refusal_opens_and_writes_nothing(stack: Stack, user: str) -> None:
    image = stack.make_image(f"polkit-refused-{user}.img")
    out = call(stack, "Export", "ssa{sv}", [str(image), "work", {}], user=user)
    assert out["error"] == "AccessDenied", out
    assert "org.qubes.blockbroker.export" in out["message"]
    assert nothing_exported(stack)
    assert any("result=refused" in line and "Export" in line for line in audit_lines(stack))


def test_attach_stays_root_only(stack: Stack) -> None:
    out = call(stack, "Attach", "s", ["/local/domain/0/backend/vbd/1/51712"], user=NOBODY)
    assert out["error"] == "AccessDenied", out
    assert "uid 0" in out["message"]
