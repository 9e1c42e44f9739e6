"""Text that a person reads in an authentication prompt: one sanitizer for untrusted strings.

Unprivileged policyd code; no I/O. polkit puts policyd's details into the action's message
($(name) expansion) verbatim, and the person decides on what that text says. A string policyd
did not make itself - what a VM claims about its device (name, description), a path a caller
chose - goes into a prompt only through `shown()`: it is cut to a bound and limited to printable
ASCII without the quote that delimits it, so it cannot start a new line, reorder the text around
it (bidi controls, right-to-left letters), hide characters (zero-width, combining marks) or
imitate policyd's own words outside its quotes. The actions' messages
(policy/org.qubes.blockbroker.policy) say which of the values are a VM's claim.
"""

from __future__ import annotations

QUOTE = "'"
REPLACEMENT = "?"  # stands for every character that is not shown as itself
ELLIPSIS = "..."
MAX_SHOWN = 64  # characters of an untrusted string in a prompt, quotes and ellipsis included
MIN_SHOWN = len(QUOTE) * 2 + len(ELLIPSIS) + 2
_SHOWN_AS_ITSELF = frozenset(chr(c) for c in range(0x20, 0x7F)) - {QUOTE}
_IEC_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def shown(untrusted: str, limit: int = MAX_SHOWN) -> str:
    """`untrusted` quoted, for a one-line prompt: printable ASCII except the quote is kept,
    every other character (newline, control, bidi, zero-width, combining, any non-ASCII)
    becomes '?'; longer than `limit` (quotes included), its middle becomes '...' so that both
    ends (a path's file name, a description's start) stay visible."""
    if limit < MIN_SHOWN:
        raise ValueError(f"limit {limit} is below {MIN_SHOWN}")
    room = limit - 2 * len(QUOTE)
    if len(untrusted) > room:
        # cut first: sanitizing a huge string would cost as much as its length
        head = (room - len(ELLIPSIS) + 1) // 2
        tail = room - len(ELLIPSIS) - head
        body = _safe(untrusted[:head]) + ELLIPSIS + _safe(untrusted[len(untrusted) - tail :])
    else:
        body = _safe(untrusted)
    return QUOTE + body + QUOTE


def _safe(untrusted: str) -> str:
    return "".join(c if c in _SHOWN_AS_ITSELF else REPLACEMENT for c in untrusted)


def size_text(size: int | None) -> str:
    """A byte count for a person: '512 bytes', '7.5 GiB'; None: 'size unknown'."""
    if size is None:
        return "size unknown"
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in _IEC_UNITS:
        value /= 1024
        if value < 1024 or unit == _IEC_UNITS[-1]:
            break
    return f"{value:.1f} {unit}"
