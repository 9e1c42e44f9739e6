"""The export registry on the real stack: read-only exports of one file share one loop device;
read-write is exclusive; the last detach frees the loop device.

Runs as root against the real stack; policyd runs as user blockbroker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness.loops import loops_of
from harness.stack import Stack
from policydlab import Api, assert_clean, held_block_fds, ro, vbd_nodes

pytestmark = [pytest.mark.root, pytest.mark.daemon]


def test_read_only_exports_share_one_loop_until_the_last_detach(stack: Stack, api: Api) -> None:
    image = stack.make_image("dedup-share.img")
    link = stack.image_dir / "dedup-share-link.img"
    os.link(image, link)  # same inode under another name: still the same backing
    first = api.export(image, "work")
    second = api.export(image, "untrusted")
    third = api.export(link, "work")
    props = [api.props(e) for e in (first, second, third)]
    assert len({(p["Major"], p["Minor"], p["Diskseq"]) for p in props}) == 1
    assert len(loops_of(image)) == 1
    assert held_block_fds(stack) == [(props[0]["Major"], props[0]["Minor"])]
    assert len(vbd_nodes(stack)) == 6

    api.detach(first)
    api.detach(third)
    assert len(loops_of(image)) == 1  # still held for the second export
    assert len(held_block_fds(stack)) == 1
    api.detach(second)
    assert_clean(stack, image)


def test_read_write_is_refused_while_shared_and_shares_nothing(stack: Stack, api: Api) -> None:
    image = stack.make_image("dedup-rw.img")
    reader = api.export(image)
    nodes_before = vbd_nodes(stack)
    assert api.export_err(image, "untrusted", **{"read-only": ro(False)}) == "Busy"
    assert vbd_nodes(stack) == nodes_before
    assert len(loops_of(image)) == 1
    api.detach(reader)

    writer = api.export(image, **{"read-only": ro(False)})
    assert api.export_err(image, "untrusted") == "Busy"
    assert api.export_err(image, "untrusted", **{"read-only": ro(False)}) == "Busy"
    assert len(loops_of(image)) == 1
    assert len(held_block_fds(stack)) == 1
    api.detach(writer)
    assert_clean(stack, image)


def test_different_files_get_different_loops(stack: Stack, api: Api) -> None:
    a = stack.make_image("dedup-a.img")
    b = stack.make_image("dedup-b.img")
    ea, eb = api.export(a), api.export(b)
    assert api.props(ea)["LoopDevice"] != api.props(eb)["LoopDevice"]
    assert len(held_block_fds(stack)) == 2
    api.detach(ea)
    api.detach(eb)
    assert_clean(stack, a, b)


def losetup(image: Path, *flags: str) -> str:
    return subprocess.run(
        ["losetup", "-f", "--show", *flags, str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()


def test_a_file_is_not_written_through_another_name(stack: Stack, api: Api) -> None:
    """A loop device someone else bound to a file, exported as a block device, still counts as
    that file: no read-write export of the file meanwhile; read-only ones share the device."""
    image = stack.make_image("dedup-alias.img")
    loop = losetup(image, "-r")
    try:
        by_device = api.export(loop)
        assert api.props(by_device)["SourceKind"] == "block"
        assert api.export_err(image, "untrusted", **{"read-only": ro(False)}) == "Busy"
        by_file = api.export(image, "untrusted")
        assert api.props(by_file)["LoopDevice"] in ("", loop)
        assert (api.props(by_file)["Major"], api.props(by_file)["Minor"]) == (
            api.props(by_device)["Major"],
            api.props(by_device)["Minor"],
        )
        assert len(held_block_fds(stack)) == 1
        api.detach(by_device)
        api.detach(by_file)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, timeout=30)
    assert_clean(stack, image)


def test_a_writable_loop_device_excludes_its_file(stack: Stack, api: Api) -> None:
    image = stack.make_image("dedup-alias-rw.img")
    loop = losetup(image)
    try:
        writer = api.export(loop, **{"read-only": ro(False)})
        assert api.export_err(image, "untrusted") == "Busy"
        assert len(loops_of(image)) == 1  # no second loop device was made
        api.detach(writer)
        reader = api.export(image, "untrusted")  # now fine: a loop device of its own
        assert api.props(reader)["LoopDevice"] != loop
        api.detach(reader)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, timeout=30)
    assert_clean(stack, image)
