"""Xvfb's screen (its -fbdir file, XWD format) as a PNG: the desktop tests' screenshots.

Test harness; reads a file Xvfb writes, writes a PNG; no other I/O. Handles what Xvfb makes:
ZPixmap, 24/32 bits per pixel, either byte order; no third-party imaging library needed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

HEADER_FIELDS = 25  # CARD32 fields of an XWD file header, before the window name
ZPIXMAP = 2
XWD_VERSION = 7


def read_rgb(path: Path) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of an XWD screen dump."""
    data = path.read_bytes()
    fields = struct.unpack(">25I", data[: HEADER_FIELDS * 4])
    header_size, version, fmt, _depth, width, height = fields[:6]
    byte_order, bpp, bytes_per_line = fields[7], fields[11], fields[12]
    red_mask, green_mask, blue_mask = fields[14:17]
    ncolors = fields[19]
    if version != XWD_VERSION or fmt != ZPIXMAP or bpp not in (24, 32):
        raise ValueError(f"{path}: unsupported XWD (version {version}, format {fmt}, {bpp} bpp)")
    offset = header_size + ncolors * 12
    step = bpp // 8
    order = "little" if byte_order == 0 else "big"
    shifts = [(mask, (mask & -mask).bit_length() - 1) for mask in (red_mask, green_mask, blue_mask)]
    out = bytearray()
    for y in range(height):
        line = data[offset + y * bytes_per_line : offset + y * bytes_per_line + width * step]
        for x in range(0, width * step, step):
            pixel = int.from_bytes(line[x : x + step], order)
            out += bytes((pixel & mask) >> shift for mask, shift in shifts)
    return width, height, bytes(out)


def write_png(
    rgb: tuple[int, int, bytes], out: Path, crop: tuple[int, int, int, int] | None = None
) -> None:
    """An RGB image (optionally cropped to x, y, width, height) as an 8-bit PNG."""
    width, height, pixels = rgb
    x0, y0, w, h = crop or (0, 0, width, height)
    x0, y0 = max(0, x0), max(0, y0)
    w, h = min(w, width - x0), min(h, height - y0)
    raw = bytearray()
    for y in range(y0, y0 + h):
        start = (y * width + x0) * 3
        raw += b"\0" + pixels[start : start + w * 3]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(raw), 9))
    png += chunk(b"IEND", b"")
    out.write_bytes(png)
