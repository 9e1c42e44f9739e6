"""The VM-side tool (`blockbroker request-export`) runs without the daemons' packages.

A VM has the client package only: the CLI and the request-export path must import nothing of
policyd (the policy engine is loaded only for `blockbroker policy ...`) nor of the broker.
Each check runs in a fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DAEMON_PACKAGES = ("policyd", "broker")

# Runs `blockbroker request-export` end to end against a fake sysfs and a fake bridge (no
# qrexec, no XenStore), then prints its exit status and the top-level packages it loaded.
RUN_REQUEST_EXPORT = """
import json, sys
from client import cli
status = cli.main(sys.argv[1:])
loaded = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"status": status, "loaded": loaded}), file=sys.stderr)
"""


def fake_sysfs(root: Path) -> Path:
    device = root / "class" / "block" / "loop0"
    device.mkdir(parents=True)
    for name, value in {"dev": "7:0", "diskseq": "9", "size": "2048", "ro": "0"}.items():
        (device / name).write_text(value + "\n")
    return root


def loaded_by(code: str, *argv: str) -> tuple[dict[str, object], str]:
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    report: dict[str, object] = json.loads(result.stderr.strip().splitlines()[-1])
    return report, result.stdout


def test_request_export_imports_nothing_of_the_daemons(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    bridge = f"{sys.executable} -c 'import sys; sys.stdin.read(); print(\"ok request 1\")'"
    report, stdout = loaded_by(
        RUN_REQUEST_EXPORT,
        "request-export",
        "loop0",
        "--to",
        "work",
        "--sysfs-root",
        str(sysfs),
        "--no-publish",
        "--bridge-command",
        bridge,
        "--as-domain",
        "sys-usb",
    )
    assert (report["status"], stdout) == (0, "ok request 1\n")
    loaded = report["loaded"]
    assert isinstance(loaded, list)
    assert "client" in loaded
    assert [name for name in loaded if name in DAEMON_PACKAGES] == []


def test_cli_loads_the_policy_engine_only_for_policy_commands(tmp_path: Path) -> None:
    code = """
import json, sys
from client import cli
cli.build_parser()
before = sorted({name.split(".")[0] for name in sys.modules})
status = cli.main(sys.argv[1:])
after = sorted(name for name in sys.modules if name.startswith("policyd"))
print(json.dumps({"status": status, "before": before, "after": after}), file=sys.stderr)
"""
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "10-test.policy").write_text("export * sys-usb work allow\n")
    report, _ = loaded_by(code, "policy", "lint", str(policy_dir))
    assert report["status"] == 0
    before = report["before"]
    assert isinstance(before, list)
    assert [name for name in before if name in DAEMON_PACKAGES] == []
    # the engine, and of policyd only the engine (the package itself and policyd.policy.*)
    after = report["after"]
    assert isinstance(after, list)
    assert "policyd.policy" in after
    assert [name for name in after if not name.startswith("policyd.policy")] == ["policyd"]
