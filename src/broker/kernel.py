"""Kernel ABI the broker uses: ioctl numbers, flags and ctypes structs, with the headers' names,
and syscall() for the calls glibc does not wrap (openat2, Landlock).

TRUST LEVEL: constants and one thin syscall wrapper, no I/O of its own; imported by the broker
(root). tests/broker/test_kernel.py compiles a C program against <linux/loop.h>, <linux/fs.h>,
<linux/openat2.h> and <linux/landlock.h> and asserts every number and struct size here equals the
real header's (Landlock rights newer than the installed header are checked against the kernel).
"""

import ctypes
import os

# <linux/loop.h>
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO = 1, 4, 16
LO_NAME_SIZE, LO_KEY_SIZE = 64, 32
LOOP_MAJOR = 7  # <linux/major.h>

# <linux/fs.h>: _IO(0x12, 94), _IOR(0x12, 114, size_t) and _IOR(0x12, 128, __u64)
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
BLKGETDISKSEQ = 0x80081280

# <linux/openat2.h>
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
SYS_openat2 = 437  # same number on every architecture (asm-generic unified table), as are:

# <linux/landlock.h>
SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
# (IOCTL_DEV: ABI 5, newer than Debian 12's 6.1 header)
LANDLOCK_ACCESS_FS_WRITE_FILE, LANDLOCK_ACCESS_FS_READ_FILE = 1 << 1, 1 << 2
LANDLOCK_ACCESS_FS_IOCTL_DEV = 1 << 15
# How many filesystem access rights (bits 0..n-1) each ABI version knows, by version: 13 up to
# MAKE_SYM (1), REFER (2), TRUNCATE (3), IOCTL_DEV (5); versions 4, 6 and 7 added none.
LANDLOCK_FS_RIGHTS = (0, 13, 14, 15, 15, 16, 16, 16)

# Every ioctl request number the broker issues; the seccomp filter allows exactly these.
IOCTLS_USED = (LOOP_CONFIGURE, LOOP_GET_STATUS64, LOOP_CTL_GET_FREE, BLKROGET, BLKGETSIZE64,
               BLKGETDISKSEQ)  # fmt: skip


class loop_info64(ctypes.Structure):  # struct loop_info64, <linux/loop.h>, in its order
    _fields_ = (
        ("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE), ("lo_init", ctypes.c_uint64 * 2),
    )  # fmt: skip


class loop_config(ctypes.Structure):  # struct loop_config, <linux/loop.h>
    _fields_ = (
        ("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
        ("info", loop_info64), ("__reserved", ctypes.c_uint64 * 8),
    )  # fmt: skip


class open_how(ctypes.Structure):  # struct open_how, <linux/openat2.h>
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class landlock_ruleset_attr(ctypes.Structure):  # <linux/landlock.h>; later fields: not used
    _fields_ = (("handled_access_fs", ctypes.c_uint64),)


class landlock_path_beneath_attr(ctypes.Structure):  # <linux/landlock.h>, packed
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def syscall(number: int, *args: object) -> int:
    """libc's syscall(2); a negative result raises OSError with its errno."""
    if (result := int(_libc.syscall(number, *args))) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result
