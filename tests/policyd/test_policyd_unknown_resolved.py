"""An fd policyd keeps after a commit of unknown outcome is resolved while policyd runs, as
soon as XenStore answers again: if the commit landed, the export it wrote is adopted (listed,
on the bus, detachable); if not, the fd is released and nothing is left. Runs a private real
stack whose policyd reaches oxenstored through a relay (xsrelay) that loses, once, either a
commit's reply (the commit happened) or the commit request itself (it never did)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.stack import Stack, StackConfig
from policydlab import (
    XVDB,
    Api,
    assert_clean,
    held_block_fds,
    remove_libxl_vbd,
    vbd_nodes,
    write_libxl_vbd,
)
from xsrelay import RelayThread, ReplyLosingRelay

pytestmark = [pytest.mark.root, pytest.mark.daemon]

RESOLVE_WAIT_S = 15.0  # policyd's first try is 0.2 s after the failure; XenStore is up


class Lab:
    def __init__(self, stack: Stack, relay: RelayThread) -> None:
        self.stack, self.relay = stack, relay
        self.api = Api(stack.bus_address)

    def resolved(self, outcome: str) -> None:
        """Wait for policyd's log line saying how the kept fd was resolved."""
        deadline = time.monotonic() + RESOLVE_WAIT_S
        log = self.stack.log_path("policyd")
        while f"outcome={outcome}" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, self.stack.log_tail("policyd")
            time.sleep(0.05)


@pytest.fixture
def lab() -> Iterator[Lab]:
    # the relay's socket must exist before policyd starts, and be reachable by its user: a
    # stack dir of our own (tmp_path sits under a 0700 parent)
    stack_dir = Path(os.path.realpath(tempfile.mkdtemp(prefix="blockbroker-unknown-")))
    stack_dir.chmod(0o755)
    relay = RelayThread(
        ReplyLosingRelay(
            stack_dir / "relay.sock",
            stack_dir / "xenstored/run/socket",
            close_after_loss=True,
            armed=False,
        )
    )
    relay.start()
    args = ["--xenstore-path", str(relay.relay.path), "--pre-attach-claim", "0"]
    stack = Stack(StackConfig(domains={"work": 1}, stack_dir=stack_dir, policyd_args=args))
    problems: list[str] = []
    try:
        stack.start()
        lab = Lab(stack, relay)
        try:
            yield lab
        finally:
            lab.api.close()
    finally:
        problems = stack.stop()
        relay.stop()
    shutil.rmtree(stack_dir, ignore_errors=True)
    assert not problems, problems


def libxl_removes(stack: Stack, be: str) -> None:
    """An Attach's backend that names no device (nor the export's tag), removed as libxl
    removes it."""
    assert not stack.xs_exists(f"{be}/physical-device")
    assert not stack.xs_exists(f"{be}/blockbroker-export")
    remove_libxl_vbd(stack, be)


def export_lost(lab: Lab, image: Path) -> str:
    lab.relay.arm(drop_request=False)
    return lab.api.export_err(image)


def attach_lost(lab: Lab, image: Path) -> str:
    be = write_libxl_vbd(lab.stack, 1, XVDB, str(image))
    lab.relay.arm(drop_request=False)
    return lab.api.err("Attach", "s", [be])


Inject = Callable[[Lab, Path], str]


@pytest.mark.parametrize("inject", [export_lost, attach_lost], ids=["export", "attach"])
def test_landed_commit_is_adopted_and_detachable(lab: Lab, inject: Inject) -> None:
    image = lab.stack.make_image("landed.img", content=b"LANDED")
    assert inject(lab, image) == "XenStore"
    assert lab.relay.relay.lost == 1
    lab.resolved("adopted")
    managed = lab.api.managed()
    assert len(managed) == 1, managed
    [(export, props)] = managed.items()
    assert props["Source"] == str(image)
    be = props["BackendPath"]
    assert lab.stack.xs_read(
        f"{be}/blockbroker-export",
    ).startswith(export.rsplit("/", 1)[1] + " ")
    assert any(s.member == "InterfacesAdded" for s in lab.api.signals)
    assert len(held_block_fds(lab.stack)) == 1
    lab.api.detach(export)
    assert lab.api.managed() == {}
    if lab.stack.xs_exists(be):  # an Attach's dir is libxl's: only its trio and tag went
        libxl_removes(lab.stack, be)
    assert_clean(lab.stack, image)


@pytest.mark.parametrize("inject", [export_lost, attach_lost], ids=["export", "attach"])
def test_lost_commit_request_releases_the_fd(lab: Lab, inject: Inject) -> None:
    image = lab.stack.make_image("never.img", content=b"NEVER")
    if inject is attach_lost:
        be = write_libxl_vbd(lab.stack, 1, XVDB, str(image))
        lab.relay.arm(drop_request=True)
        assert lab.api.err("Attach", "s", [be]) == "XenStore"
        libxl_removes(lab.stack, be)
    else:
        lab.relay.arm(drop_request=True)
        assert lab.api.export_err(image) == "XenStore"
        assert vbd_nodes(lab.stack) == []
    assert lab.relay.relay.lost == 1
    lab.resolved("released")
    assert lab.api.managed() == {}
    assert_clean(lab.stack, image)
