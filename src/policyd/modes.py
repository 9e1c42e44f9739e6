"""An export's mode, in one vocabulary: XenStore's "r"/"w" is the canonical spelling.

Unprivileged policyd code; no I/O. The vbd's `mode` node and the Export object's Mode property
say "r" or "w"; the D-Bus option is "read-only"; the broker and the registry take a `writable`
flag; the policy engine says "ro"/"rw". Every conversion between them is here.
"""

from __future__ import annotations

READ_ONLY = "r"
READ_WRITE = "w"
MODES = (READ_ONLY, READ_WRITE)


def from_read_only(read_only: bool) -> str:
    return READ_ONLY if read_only else READ_WRITE


def from_writable(writable: bool) -> str:
    return READ_WRITE if writable else READ_ONLY


def is_writable(mode: str) -> bool:
    return mode == READ_WRITE


def policy_mode(mode: str) -> str:
    """The policy engine's spelling (policyd.policy.Mode): "ro" or "rw"."""
    return "rw" if mode == READ_WRITE else "ro"


def in_words(mode: str) -> str:
    """As a person reads it (authentication prompts): "read-only" or "read-write"."""
    return "read-write" if mode == READ_WRITE else "read-only"
