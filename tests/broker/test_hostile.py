"""Hostile input against the real broker: every bad request gets its error code (or, when the
frame itself is malformed, the connection ends), nothing leaks, and the broker keeps serving."""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerlab import (
    Broker,
    bound_loops,
    exchange_raw,
    make_image,
    settled_fd_count,
)
from harness.brokerclient import BrokerClient

from broker import protocol
from broker.protocol import ErrorCode, ReplyKind, Request, RequestFlag, RequestKind
from policyd.brokerclient import BrokerError, encode_request, parse_reply

pytestmark = pytest.mark.root

HEADER = protocol.REQUEST_HEADER


def header(**fields: int) -> bytes:
    values = dict(
        version=1, kind=2, flags=0, block_size=0, major=0, minor=0, diskseq=0, path_len=0, res=0
    )
    values.update(fields)
    return HEADER.pack(*values.values())


def loop_frame(path: bytes) -> bytes:
    return encode_request(Request(RequestKind.LOOP_FILE, path=path))


MALFORMED = {
    "one byte": b"\x01",
    "truncated header": header(path_len=4)[:10],
    "header only, path missing": header(path_len=4),
    "path longer than path_len": header(path_len=2) + b"/abc",
    "oversized": header(path_len=protocol.MAX_PATH + 1) + b"/" * (protocol.MAX_PATH + 1),
    "huge": b"\x01\x02" + b"A" * 60000,
    "unknown kind": header(kind=99, path_len=2) + b"/a",
    "reply kind as request": header(kind=0x81, path_len=2) + b"/a",
    "wrong version": header(version=2, path_len=2) + b"/a",
    "reserved bits": header(res=1, path_len=2) + b"/a",
    "unknown flag": header(flags=0x100, path_len=2) + b"/a",
    "expect flag on LOOP_FILE": header(flags=int(RequestFlag.EXPECT_DEV), path_len=2) + b"/a",
    "IDENTIFY with a path": header(kind=3, path_len=2) + b"/a",
    "OPEN_BLOCK without path": header(kind=1),
    "major without EXPECT_DEV": header(kind=1, major=7, path_len=2) + b"/a",
    "block_size on OPEN_BLOCK": header(kind=1, block_size=512, path_len=2) + b"/a",
}


@pytest.fixture
def idle_fds(broker: Broker) -> Iterator[int]:
    broker.assert_serves()  # warm up: the first request may open lazily-imported things
    count = settled_fd_count(broker, -1, timeout=0.2)
    yield count
    assert settled_fd_count(broker, count) == count, "the broker leaked an fd"
    assert bound_loops(broker.root) == [] or all(n for n in bound_loops(broker.root)), "unreachable"
    broker.assert_serves()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_ends_connection(broker: Broker, idle_fds: int, name: str) -> None:
    assert exchange_raw(broker, MALFORMED[name]) == b"", name
    assert broker.wait_log("event=protocol_violation")


def test_random_garbage_frames(broker: Broker, idle_fds: int) -> None:
    rng = random.Random(1234)
    for _ in range(50):
        frame = rng.randbytes(rng.randint(1, 300))
        reply = exchange_raw(broker, frame)
        if reply:  # garbage that happens to parse must still get a well-formed reply
            assert parse_reply(reply).kind in (ReplyKind.OK, ReplyKind.ERROR)


def test_fd_on_a_request_that_takes_none(broker: Broker, idle_fds: int) -> None:
    image = make_image(broker.root / "a.img")
    with open(image, "rb") as f:
        assert exchange_raw(broker, loop_frame(str(image).encode()), [f.fileno()]) == b""
        open_block = encode_request(Request(RequestKind.OPEN_BLOCK, path=b"/dev/null"))
        assert exchange_raw(broker, open_block, [f.fileno()]) == b""
    assert bound_loops(broker.root) == []


@pytest.mark.parametrize("count", [0, 2, 8])
def test_identify_with_wrong_fd_count(broker: Broker, idle_fds: int, count: int) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(count)]
    try:
        assert exchange_raw(broker, encode_request(Request(RequestKind.IDENTIFY)), fds) == b""
    finally:
        for fd in fds:
            os.close(fd)


def refused(client: BrokerClient, path: str | bytes, **kwargs: bool) -> ErrorCode:
    """The error code of a LOOP_FILE request for `path` (str, or raw bytes via fsdecode)."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    with pytest.raises(BrokerError) as e:
        fd, ident = client.loop_file(text, writable=kwargs.get("writable", False))
        os.close(fd)
        pytest.fail(f"{path!r} was bound to {ident}")
    return e.value.code


def test_bad_paths(broker: Broker, idle_fds: int, tmp_path: Path) -> None:
    root = broker.root
    make_image(root / "good.img")
    (root / "sub").mkdir()
    make_image(root / "sub" / "inner.img")
    outside = make_image(tmp_path / "outside.img")
    sibling = tmp_path / (root.name + "-evil")
    sibling.mkdir()
    make_image(sibling / "x.img")
    (root / "link-in").symlink_to(root / "good.img")
    (root / "link-out").symlink_to(outside)
    (root / "dirlink").symlink_to(root / "sub")
    os.mkfifo(root / "fifo")
    os.mknod(root / "blocknode", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(root / "charnode", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    cases: list[tuple[str | bytes, ErrorCode]] = [
        (f"{root}/../outside.img", ErrorCode.BAD_PATH),
        (f"{root}/./good.img", ErrorCode.BAD_PATH),
        (f"{root}//good.img", ErrorCode.BAD_PATH),
        (f"{root}/sub/", ErrorCode.BAD_PATH),
        ("good.img", ErrorCode.BAD_PATH),
        (f"{root}/good\0.img".encode(), ErrorCode.BAD_PATH),
        (f"{root}/caf\xe9".encode("latin-1"), ErrorCode.BAD_PATH),  # not UTF-8
        (str(outside), ErrorCode.OUTSIDE_ROOTS),
        (f"{sibling}/x.img", ErrorCode.OUTSIDE_ROOTS),
        (str(root), ErrorCode.OUTSIDE_ROOTS),
        ("/etc/passwd", ErrorCode.OUTSIDE_ROOTS),
        ("/dev/loop-control", ErrorCode.OUTSIDE_ROOTS),
        (f"{root}/link-in", ErrorCode.SYMLINK),
        (f"{root}/link-out", ErrorCode.SYMLINK),
        (f"{root}/dirlink/inner.img", ErrorCode.SYMLINK),
        (f"{root}/missing.img", ErrorCode.NOT_FOUND),
        (f"{root}/sub", ErrorCode.NOT_REGULAR_FILE),
        (f"{root}/fifo", ErrorCode.NOT_REGULAR_FILE),  # must not block
        (f"{root}/blocknode", ErrorCode.NOT_REGULAR_FILE),
        (f"{root}/charnode", ErrorCode.NOT_REGULAR_FILE),
        ("/" + "a" * 5000, ErrorCode.BAD_ARGUMENT),  # refused by the client before sending
    ]
    client = broker.client()
    try:
        for path, code in cases:
            assert refused(client, path) == code, path
            assert refused(client, path, writable=True) == code, path
        # the same bytes through OPEN_BLOCK
        with pytest.raises(BrokerError) as e:
            client.open_block(os.fsdecode(b"/dev/\xff"), writable=False)
        assert e.value.code == ErrorCode.BAD_PATH
        fd, _ = client.loop_file(f"{root}/sub/inner.img", writable=False)  # still serves
        os.close(fd)
    finally:
        client.close()


def test_symlink_swapped_in_between_calls(broker: Broker, idle_fds: int, tmp_path: Path) -> None:
    image = make_image(broker.root / "swap.img")
    outside = make_image(tmp_path / "secret.img", fill=b"S")
    client = broker.client()
    try:
        fd, _ = client.loop_file(str(image), writable=False)
        os.close(fd)
        (broker.root / "tmp-link").symlink_to(outside)
        os.replace(broker.root / "tmp-link", image)
        assert refused(client, str(image)) == ErrorCode.SYMLINK
    finally:
        client.close()


def test_symlink_swap_race(broker: Broker, idle_fds: int, tmp_path: Path) -> None:
    """While another thread keeps swapping the file and a symlink to a file outside the root,
    every answer is either the real in-root file or a SYMLINK refusal, never the outside one."""
    target = broker.root / "racy.img"
    real = make_image(broker.root / "real.img", fill=b"R")
    outside = make_image(tmp_path / "outside.img", fill=b"O")
    (broker.root / "as-link").symlink_to(outside)
    os.link(real, broker.root / "as-file")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            os.link(broker.root / "as-file", broker.root / "tmp-file")
            os.replace(broker.root / "tmp-file", target)
            (broker.root / "tmp-link").symlink_to(outside)
            os.replace(broker.root / "tmp-link", target)

    thread = threading.Thread(target=swapper)
    thread.start()
    client = broker.client()
    seen = {"ok": 0, "symlink": 0}
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                fd, ident = client.loop_file(str(target), writable=False)
            except BrokerError as e:
                assert e.code in (ErrorCode.SYMLINK, ErrorCode.NOT_FOUND), e
                seen["symlink"] += 1
                continue
            try:
                assert (ident.backing_dev, ident.backing_ino) == (
                    real.stat().st_dev,
                    real.stat().st_ino,
                )
                assert os.pread(fd, 1, 0) == b"R"
                seen["ok"] += 1
            finally:
                os.close(fd)
    finally:
        stop.set()
        thread.join()
        client.close()
    assert seen["ok"] and seen["symlink"], seen
