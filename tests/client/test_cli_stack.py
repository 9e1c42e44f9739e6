"""The `blockbroker` CLI against the real stack: export, list, detach, status, errors, exit codes.

Runs as root with real daemons; every export is checked against XenStore and /sys/block/loopN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.stack import Stack, StackConfig
from vbd import (
    cli,
    cli_json,
    frontend_path,
    leaked_loops,
    loop_backing_file,
    loop_diskseq,
    loop_readonly,
    physical_device,
    wait_loop_released,
)

pytestmark = [pytest.mark.root, pytest.mark.daemon]

NOBODY = 65534


@pytest.fixture
def image(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = stack.make_image(f"cli-{request.node.name}.img", 1 << 20, b"blockbroker cli test\n")
    yield path
    leftovers = [e for e in cli_json(stack, "list") if e["source"] == str(path)]
    for export in leftovers:
        cli(stack, "detach", export["export"])
    path.unlink()
    assert not leftovers, f"test left exports behind: {leftovers}"


def check_exported(stack: Stack, export: dict[str, object], image: Path, mode: str) -> None:
    loop = str(export["loop_device"])
    assert loop_backing_file(loop) == str(image)
    assert loop_diskseq(loop) == export["diskseq"]
    assert loop_readonly(loop) == (mode == "r")
    assert os.major(os.stat(loop).st_rdev) == export["major"]
    assert os.minor(os.stat(loop).st_rdev) == export["minor"]
    be = str(export["backend_path"])
    assert stack.xs_read(f"{be}/physical-device") == physical_device(
        int(str(export["major"])), int(str(export["minor"]))
    )
    assert stack.xs_read(f"{be}/diskseq") == f"{export['diskseq']:x}"
    assert stack.xs_read(f"{be}/physical-device-path") == loop
    assert stack.xs_read(f"{be}/mode") == mode
    assert stack.xs_read(f"{be}/params") == str(image)
    fe = frontend_path(int(str(export["frontend_domid"])), int(str(export["devid"])))
    assert stack.xs_read(f"{fe}/backend") == be


def check_detached(stack: Stack, export: dict[str, object]) -> None:
    be = str(export["backend_path"])
    fe = frontend_path(int(str(export["frontend_domid"])), int(str(export["devid"])))
    assert not stack.xs_exists(be)
    assert not stack.xs_exists(fe)
    assert wait_loop_released(str(export["loop_device"]), int(str(export["diskseq"])))


def test_export_list_detach_by_id(stack: Stack, image: Path) -> None:
    (export,) = cli_json(stack, "export", str(image), "--to", "work")
    required = {"export", "loop_device", "major", "minor", "diskseq", "backend_path", "mode"}
    assert required <= export.keys()
    assert export["export"].startswith("/org/qubes/BlockBroker1/export/")
    assert export["mode"] == "r"
    assert export["frontend_domain"] == "work"
    assert export["frontend_domid"] == 1
    assert export["source"] == str(image)
    assert export["backend_path"] == f"/local/domain/0/backend/vbd/1/{export['devid']}"
    check_exported(stack, export, image, "r")

    listed = cli_json(stack, "list")
    assert export in listed

    human = cli(stack, "list")
    assert human.returncode == 0
    header, *rows = human.stdout.splitlines()
    assert header.split()[:3] == ["ID", "FRONTEND", "DEVID"]
    assert any(row.split()[0] == export["id"] and str(image) in row for row in rows)

    result = cli(stack, "detach", export["id"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    check_detached(stack, export)
    assert export["export"] not in [e["export"] for e in cli_json(stack, "list")]


def test_export_rw_with_devid_detach_by_object_path(stack: Stack, image: Path) -> None:
    (export,) = cli_json(
        stack, "export", str(image), "--to", "untrusted", "--rw", "--devid", "51728"
    )
    assert export["mode"] == "w"
    assert export["devid"] == 51728
    assert export["frontend_domid"] == 2
    check_exported(stack, export, image, "w")
    assert cli(stack, "detach", export["export"]).returncode == 0
    check_detached(stack, export)


def test_detach_by_backend_path_and_human_export_output(stack: Stack, image: Path) -> None:
    result = cli(stack, "export", str(image), "--to", "work")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    export = cli_json(stack, "list")
    (mine,) = [e for e in export if e["export"] == fields["export"]]
    assert fields["loop_device"] == mine["loop_device"]
    assert fields["diskseq"] == f"{mine['diskseq']:#x}"  # hex for people, a number in JSON
    assert cli(stack, "detach", mine["backend_path"]).returncode == 0
    check_detached(stack, mine)


def test_detach_by_libxl_relative_backend_path(stack: Stack, image: Path) -> None:
    (export,) = cli_json(stack, "export", str(image), "--to", "work")
    relative = export["backend_path"].removeprefix("/local/domain/0/")
    assert relative.startswith("backend/vbd/1/")
    result = cli(stack, "detach", relative)
    assert result.returncode == 0, result.stderr
    check_detached(stack, export)


def test_relative_path_is_made_absolute(stack: Stack, image: Path) -> None:
    result = cli(stack, "export", os.path.relpath(image), "--to", "work", "--json")
    assert result.returncode == 0, result.stderr
    export = json.loads(result.stdout)
    assert export["source"] == str(image)
    assert cli(stack, "detach", export["id"]).returncode == 0
    check_detached(stack, export)


def test_status(stack: Stack, image: Path) -> None:
    (status,) = cli_json(stack, "status")
    assert status["broker_connected"] is True
    assert status["xenstore_connected"] is True
    assert status["version"]
    (export,) = cli_json(stack, "export", str(image), "--to", "work")
    (after,) = cli_json(stack, "status")
    assert after["export_count"] == status["export_count"] + 1
    human = cli(stack, "status")
    assert "broker connected    yes" in human.stdout
    assert cli(stack, "detach", export["id"]).returncode == 0


@pytest.mark.parametrize(
    ("args", "error_name", "status"),
    [
        (["detach", "999999"], "NotFound", 1),
        (["detach", "/local/domain/0/backend/vbd/1/4242"], "NotFound", 1),
        (["export", "{image}", "--to", "no-such-domain"], "UnknownDomain", 1),
        (["export", "{missing}", "--to", "work"], "NotFound", 1),
        (["export", "/etc/hostname", "--to", "work"], None, 1),
        (["export", "{image}", "--to", "work", "--devid", "0"], "InvalidArgument", 1),
    ],
)
def test_service_errors(
    stack: Stack, image: Path, args: list[str], error_name: str | None, status: int
) -> None:
    argv = [a.format(image=image, missing=image.with_name("missing.img")) for a in args]
    before = cli_json(stack, "list")
    result = cli(stack, *argv)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("blockbroker: org.qubes.BlockBroker1.Error.")
    if error_name:
        assert result.stderr.startswith(f"blockbroker: org.qubes.BlockBroker1.Error.{error_name}: ")
    assert cli_json(stack, "list") == before
    assert leaked_loops(stack) == []


def test_file_outside_roots_is_refused_and_nothing_leaks(stack: Stack, tmp_path: Path) -> None:
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    result = cli(stack, "export", str(outside), "--to", "work")
    assert result.returncode == 1
    assert "org.qubes.BlockBroker1.Error." in result.stderr
    assert not [e for e in cli_json(stack, "list") if e["source"] == str(outside)]
    assert not stack.xs_ls("/local/domain/1/device/vbd") or all(
        stack.xs_read(f"/local/domain/0/backend/vbd/1/{d}/params") != str(outside)
        for d in stack.xs_ls("/local/domain/1/device/vbd")
    )


def test_access_denied_for_unprivileged_caller(stack: Stack, image: Path) -> None:
    image.chmod(0o644)
    result = cli(stack, "export", str(image), "--to", "work", user=NOBODY)
    assert result.returncode == 4, result.stderr
    assert "AccessDenied" in result.stderr
    # reading is open to everyone
    listed = cli(stack, "list", "--json", user=NOBODY)
    assert listed.returncode == 0, listed.stderr


def test_service_not_running_exits_3(stack_factory: object) -> None:
    from collections.abc import Callable

    assert callable(stack_factory)
    start: Callable[[StackConfig], Stack] = stack_factory
    quiet = start(StackConfig(domains={"work": 1}, policyd=False, broker=False))
    for args in (["list"], ["status"], ["detach", "1"]):
        result = cli(quiet, *args)
        assert result.returncode == 3, result.stderr
        assert "org.freedesktop.DBus.Error.ServiceUnknown" in result.stderr
        assert "is policyd running?" in result.stderr


def test_watch_prints_events_as_json_lines(stack: Stack, image: Path) -> None:
    import subprocess
    import threading
    import time

    from vbd import CLI

    watcher = subprocess.Popen(
        [str(CLI), "watch", "--json"], env=stack.env(), stdout=subprocess.PIPE, text=True
    )
    killer = threading.Timer(15, watcher.kill)  # a hung watch fails the test, not the run
    killer.start()
    try:
        time.sleep(0.5)  # let it subscribe
        (export,) = cli_json(stack, "export", str(image), "--to", "work")
        assert cli(stack, "detach", export["id"]).returncode == 0
        assert watcher.stdout is not None
        seen: list[dict[str, object]] = []
        while not any(e["event"] == "removed" for e in seen):
            line = watcher.stdout.readline()
            assert line, f"watch ended early; saw {seen}"
            seen.append(json.loads(line))
    finally:
        killer.cancel()
        watcher.terminate()
        watcher.wait(5)
    added = next(e for e in seen if e["event"] == "added")
    assert added["export"] == export["export"]
    assert added["diskseq"] == export["diskseq"]
    removed = next(e for e in seen if e["event"] == "removed")
    assert removed["export"] == export["export"]


def test_export_by_fd(stack: Stack, image: Path) -> None:
    """--fd: the CLI opens the block device with the caller's rights and passes it (ExportFd)."""
    import subprocess

    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        result = cli(stack, "export", loop, "--fd", "--to", "work", "--json")
        assert result.returncode == 0, result.stderr
        export = json.loads(result.stdout)
        assert export["source_kind"] == "block"
        rdev = os.stat(loop).st_rdev
        assert (export["major"], export["minor"]) == (os.major(rdev), os.minor(rdev))
        be = export["backend_path"]
        assert stack.xs_read(f"{be}/physical-device") == physical_device(
            os.major(rdev), os.minor(rdev)
        )
        assert cli(stack, "detach", export["id"]).returncode == 0
        assert not stack.xs_exists(be)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def test_export_by_fd_of_a_missing_path_is_a_usage_error(stack: Stack, tmp_path: Path) -> None:
    result = cli(stack, "export", str(tmp_path / "nope"), "--fd", "--to", "work")
    assert result.returncode == 2
    assert "cannot open" in result.stderr
