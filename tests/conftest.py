"""Test-wide rules: lanes that need root, daemons or Xen are marked, and under CI=true a skip in
such a lane is a failure, so a green CI means every real-component lane really ran."""

from __future__ import annotations

import os

import pytest

REAL_LANES = ("root", "daemon", "xen")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("root") or item.get_closest_marker("daemon"):
            item.add_marker(pytest.mark.skip(reason="needs root (run `make test` as root)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not in_ci() or not report.skipped:
        return
    lanes = [lane for lane in REAL_LANES if item.get_closest_marker(lane)]
    if lanes:
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: lane {'/'.join(lanes)} must run, but it was skipped: {report.longrepr}"
        )
