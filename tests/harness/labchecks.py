"""The Xen lab's check lines (`XENLAB CHECK <name> PASS|FAIL <detail>`), as both lab lanes read
them from their run's output (tests/xen). Test code, run as root on the host; not shipped."""

from __future__ import annotations

import re

CHECK_LINE = re.compile(
    r"^XENLAB CHECK (?P<name>[a-z0-9-]+) (?P<status>PASS|FAIL) ?(?P<detail>.*)$"
)


def parse_checks(stdout: str) -> dict[str, tuple[str, str]]:
    """Each check's (status, detail) by name; a check reported twice keeps its last line."""
    checks: dict[str, tuple[str, str]] = {}
    for line in stdout.splitlines():
        match = CHECK_LINE.match(line.strip())
        if match:
            checks[match["name"]] = (match["status"], match["detail"])
    return checks
