"""Fixtures for the broker tests (helpers live in brokerlab.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerlab import Broker, start_broker, stop_broker, wait_no_loops, write_config


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # pytest's tmp dirs are root-owned 0700: a root without capabilities can still use them.
    (tmp_path / "root").mkdir()
    return tmp_path


@pytest.fixture
def broker(workdir: Path) -> Iterator[Broker]:
    root = workdir / "root"
    config = write_config(workdir / "broker.toml", "root", [root], [7])
    b = start_broker(config, workdir / "broker.sock", root)
    yield b
    stop_broker(b)
    assert wait_no_loops(root) == [], "loop devices leaked"
