"""Bad input to Export/ExportFd: every case is a named error, and nothing leaks (no loop device on
the test's files, no XenStore node, no fd held by policyd).

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from harness.stack import Stack
from policydlab import XVDB, Api, assert_clean, open_fd_count, ro, u32, vbd_nodes

pytestmark = [pytest.mark.root, pytest.mark.daemon]


@pytest.fixture
def image(stack: Stack) -> Path:
    return stack.make_image("bad-input.img")


def test_unknown_domain(stack: Stack, api: Api, image: Path) -> None:
    assert api.export_err(image, "nosuchvm") == "UnknownDomain"
    assert_clean(stack, image)


@pytest.mark.parametrize(
    "name", ["", "a" * 32, "bad name", "../work", "work\n", "dom/0", "wörk", "-" * 40]
)
def test_invalid_domain_names(stack: Stack, api: Api, image: Path, name: str) -> None:
    assert api.export_err(image, name) == "InvalidArgument"
    assert_clean(stack, image)


def test_nonexistent_file(stack: Stack, api: Api) -> None:
    missing = stack.image_dir / "does-not-exist.img"
    assert api.export_err(missing) == "NotFound"
    assert_clean(stack)


def test_path_outside_the_broker_roots(stack: Stack, api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    os.chmod(tmp_path, 0o755)
    assert api.export_err(outside) == "Refused"
    assert api.export_err("/etc/passwd") == "Refused"
    assert_clean(stack, outside)


def test_symlink(stack: Stack, api: Api, image: Path) -> None:
    link = stack.image_dir / "bad-input-link.img"
    link.symlink_to(image)
    assert api.export_err(link) == "Refused"
    assert_clean(stack, image)


def test_directory_and_special_files(stack: Stack, api: Api) -> None:
    directory = stack.image_dir / "a-directory"
    directory.mkdir()
    assert api.export_err(directory) == "InvalidArgument"
    fifo = stack.image_dir / "a-fifo"
    os.mkfifo(fifo)
    assert api.export_err(fifo) == "InvalidArgument"
    sock_path = stack.image_dir / "a-socket"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert api.export_err(sock_path) == "InvalidArgument"
    assert_clean(stack)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "relative.img",
        "/images/../etc/shadow",
        "//double/slash.img",
        "/trailing/",
        "/with\nnewline.img",
        "/caf\u00e9.img",
        "/" + "a" * 4096,
    ],
)
def test_malformed_paths(stack: Stack, api: Api, path: str) -> None:
    assert api.export_err(path) == "InvalidArgument"
    assert_clean(stack)


@pytest.mark.parametrize(
    "options",
    [
        {"read-only": Variant("s", "yes")},
        {"devid": Variant("i", XVDB)},
        {"devid": u32(XVDB + 1)},  # a partition
        {"devid": u32(0)},
        {"devid": u32(2**32 - 1)},
        {"direct-io": Variant("u", 1)},
        {"no-such-option": ro()},
    ],
)
def test_invalid_options(stack: Stack, api: Api, image: Path, options: dict[str, Any]) -> None:
    assert api.export_err(image, "work", **options) == "InvalidArgument"
    assert_clean(stack, image)


def test_busy_devid_leaves_nothing(stack: Stack, api: Api, image: Path) -> None:
    stack.xs_write(f"/local/domain/1/device/vbd/{XVDB}/state", "1")  # someone else's device
    try:
        assert api.export_err(image, "work", devid=u32(XVDB)) == "Busy"
        assert vbd_nodes(stack) == [f"/local/domain/1/device/vbd/{XVDB}"]
    finally:
        stack.xs_rm(f"/local/domain/1/device/vbd/{XVDB}")
    assert_clean(stack, image)


def test_wrong_signature(stack: Stack, api: Api, image: Path) -> None:
    assert api.err("Export", "ss", [str(image), "work"]) == "InvalidArgument"
    assert api.err("Attach", "u", [1]) == "InvalidArgument"
    assert_clean(stack, image)


def test_export_fd_without_the_fd(stack: Stack, api: Api) -> None:
    """A message with 'h' but no fds: dbus-fast would hand policyd the raw index (fd 0)."""
    before = open_fd_count(stack)
    assert api.err("ExportFd", "hsa{sv}", [0, "work", {}]) == "InvalidArgument"
    assert api.err("ExportFd", "hsa{sv}", [5, "work", {}]) == "InvalidArgument"
    assert open_fd_count(stack) == before
    assert_clean(stack)


def test_export_fd_of_a_regular_file_or_wrong_mode(stack: Stack, api: Api, image: Path) -> None:
    before = open_fd_count(stack)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert api.err("ExportFd", "hsa{sv}", [0, "work", {}], fds=[fd]) == "InvalidArgument"
    finally:
        os.close(fd)
    holder = api.export(image)
    loop_fd = os.open(api.props(holder)["LoopDevice"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        body = [0, "work", {"read-only": ro(False)}]
        assert api.err("ExportFd", "hsa{sv}", body, fds=[loop_fd]) == "InvalidArgument"
        assert api.err("ExportFd", "hsa{sv}", [0, "nosuchvm", {}], fds=[loop_fd]) == (
            "UnknownDomain"
        )
    finally:
        os.close(loop_fd)
    api.detach(holder)
    assert open_fd_count(stack) == before
    assert_clean(stack, image)


def test_fds_sent_to_other_methods_are_closed(stack: Stack, api: Api, image: Path) -> None:
    before = open_fd_count(stack)
    fds = [os.open(image, os.O_RDONLY | os.O_CLOEXEC) for _ in range(3)]
    try:
        api.call("Export", "ssa{sv}h", [str(image), "work", {}, 0], fds=fds[:1])
        api.call("GetAll", "sh", ["x", 0], iface="org.freedesktop.DBus.Properties", fds=fds[1:2])
        api.call("ExportFd", "hsa{sv}", [0, "nosuchvm", {}], fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    api.pump()
    assert open_fd_count(stack) == before
    assert_clean(stack, image)


def test_junk_domains_in_xenstore(stack: Stack, api: Api, image: Path) -> None:
    """Entries under /local/domain that are not domains, or carry junk names, are ignored; a
    name two domains claim is refused rather than guessed."""
    junk = {
        "/local/domain/notadomid/name": "work",
        "/local/domain/00017/name": "work",
        "/local/domain/99999/name": "work",
        "/local/domain/40/name": "bad name!",
        "/local/domain/41/name": "x" * 40,
    }
    for path, value in junk.items():
        stack.xs_write(path, value)
    try:
        export = api.export(image, "work")
        assert api.props(export)["FrontendDomid"] == 1
        api.detach(export)
        assert api.export_err(image, "bad name!") == "InvalidArgument"
        stack.xs_write("/local/domain/42/name", "work")  # a second "work"
        assert api.export_err(image, "work") == "XenStore"
    finally:
        for path in [*junk, "/local/domain/42/name"]:
            stack.xs_rm(path.rsplit("/", 1)[0])
    stack.xs_rm("/local/domain/0/backend/vbd/1")
    stack.xs_rm("/local/domain/1/device/vbd")
    assert_clean(stack, image)
