"""Wire format between policyd and the broker: fixed-layout binary frames on SOCK_SEQPACKET.

TRUST LEVEL: pure code, no privileges and no I/O. The broker (root) parses requests with it;
the input is untrusted and anything that is not exactly a valid frame raises FrameError and
nothing else. policyd's client imports the layouts and enums from here; its own half, encoding
requests and parsing replies, is in policyd/brokerclient.py, since the broker never runs it.

One datagram is one frame. A request is REQUEST_HEADER followed by exactly `path_len` path bytes;
a reply is REPLY_HEADER followed by exactly `message_len` message bytes. Fields a request kind does
not use must be zero. docs/protocol.md is the reference for every field and rule.
"""

import enum
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 1
MAX_PATH = 4095  # PATH_MAX minus the NUL the kernel adds
MAX_MESSAGE = 255

#   version u8, kind u8, flags u16, block_size u32, expect_major u32, expect_minor u32,
#   expect_diskseq u64, path_len u16, reserved u16  (little endian, no padding)
REQUEST_HEADER = struct.Struct("<BBHIIIQHH")
#   version u8, kind u8, code u16, errno i32, major u32, minor u32, diskseq u64, size u64,
#   backing_dev u64, backing_ino u64, message_len u16, reserved u16
REPLY_HEADER = struct.Struct("<BBHiIIQQQQHH")
MAX_REQUEST = REQUEST_HEADER.size + MAX_PATH


class FrameError(ValueError):
    """The bytes are not a valid frame; the receiver ends the connection."""


class RequestKind(enum.IntEnum):
    OPEN_BLOCK = 1
    LOOP_FILE = 2
    IDENTIFY = 3


class ReplyKind(enum.IntEnum):
    OK = 0x81
    ERROR = 0x82


class RequestFlag(enum.IntFlag):
    WRITABLE = 0x1
    EXPECT_DEV = 0x2  # OPEN_BLOCK: expect_major/expect_minor are set
    EXPECT_DISKSEQ = 0x4  # OPEN_BLOCK: expect_diskseq is set
    DIRECT_IO = 0x8  # LOOP_FILE


class ErrorCode(enum.IntEnum):
    """Stable error codes of an ERROR reply (and of BrokerError on the client side)."""

    OK = 0
    BAD_PATH = 1  # not absolute, not UTF-8, NUL, '..' or '.' component, empty component
    NOT_FOUND = 2
    NOT_BLOCK_DEVICE = 3
    MAJOR_NOT_ALLOWED = 4
    ROOT_DISK = 5  # the dom0 root filesystem's disk or one of its partitions
    IDENTITY_MISMATCH = 6  # expected major:minor or diskseq differs
    OUTSIDE_ROOTS = 7
    SYMLINK = 8
    NOT_REGULAR_FILE = 9
    OPEN_FAILED = 10  # the kernel refused the open (errno says why)
    BAD_ARGUMENT = 11  # e.g. an invalid block size
    LOOP_FAILED = 12  # allocation or LOOP_CONFIGURE failed
    LOOP_BUSY = 13  # bounded retry exhausted
    VERIFY_FAILED = 14  # the bound device is not what was asked for; it was released
    INTERNAL = 15
    PROTOCOL = 16  # client side only: the reply broke the protocol
    UNAVAILABLE = 17  # client side only: the broker cannot be reached
    IN_USE = 18  # mounted, swap, a dm/md member, or a disk holding one (O_EXCL refused)


NO_FLAGS = RequestFlag(0)
OPEN_BLOCK_FLAGS = RequestFlag.WRITABLE | RequestFlag.EXPECT_DEV | RequestFlag.EXPECT_DISKSEQ
ALLOWED_FLAGS = {
    RequestKind.OPEN_BLOCK: OPEN_BLOCK_FLAGS,
    RequestKind.LOOP_FILE: RequestFlag.WRITABLE | RequestFlag.DIRECT_IO,
    RequestKind.IDENTIFY: NO_FLAGS,
}


@dataclass(frozen=True)
class Request:  # field order = REQUEST_HEADER order (encode packs vars() in order)
    kind: RequestKind
    flags: RequestFlag = NO_FLAGS
    block_size: int = 0
    expect_major: int = 0
    expect_minor: int = 0
    expect_diskseq: int = 0
    path: bytes = b""


@dataclass(frozen=True)
class Reply:  # field order = REPLY_HEADER order (encode packs vars() in order)
    kind: ReplyKind
    code: ErrorCode = ErrorCode.OK
    errno: int = 0
    major: int = 0
    minor: int = 0
    diskseq: int = 0
    size: int = 0
    backing_dev: int = 0
    backing_ino: int = 0
    message: str = ""


def parse_request(untrusted_frame: bytes) -> Request:
    if not REQUEST_HEADER.size <= len(untrusted_frame) <= MAX_REQUEST:
        raise FrameError(f"request length {len(untrusted_frame)} out of range")
    fields = REQUEST_HEADER.unpack_from(untrusted_frame)
    version, kind, flags, block_size, major, minor, diskseq, path_len, reserved = fields
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version} unsupported")
    if kind not in RequestKind.__members__.values():
        raise FrameError(f"unknown request kind {kind}")
    kind = RequestKind(kind)
    if reserved != 0 or flags & ~int(ALLOWED_FLAGS[kind]):  # int: ~IntFlag keeps known bits only
        raise FrameError("reserved bits set")
    if path_len != len(untrusted_frame) - REQUEST_HEADER.size:
        raise FrameError("path length does not match the frame length")
    path = bytes(untrusted_frame[REQUEST_HEADER.size :])
    if kind == RequestKind.IDENTIFY and (path or block_size or major or minor or diskseq):
        raise FrameError("IDENTIFY takes no fields")
    if kind != RequestKind.IDENTIFY and not path:
        raise FrameError("empty path")
    if kind != RequestKind.LOOP_FILE and block_size:
        raise FrameError("block_size is for LOOP_FILE only")
    if (major or minor) and not flags & RequestFlag.EXPECT_DEV:
        raise FrameError("expected major:minor given without EXPECT_DEV")
    if diskseq and not flags & RequestFlag.EXPECT_DISKSEQ:
        raise FrameError("expected diskseq given without EXPECT_DISKSEQ")
    return Request(kind, RequestFlag(flags), block_size, major, minor, diskseq, path)


def encode_reply(reply: Reply) -> bytes:
    message = reply.message.encode("utf-8", "replace")[:MAX_MESSAGE]
    message = message.decode("utf-8", "ignore").encode()  # never cut inside a character
    header = REPLY_HEADER.pack(PROTOCOL_VERSION, *list(vars(reply).values())[:-1], len(message), 0)
    return header + message
