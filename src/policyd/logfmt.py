"""logfmt-style logging to stderr for policyd.

Unprivileged policyd code. Values that come from callers are quoted and escaped here, so a caller
cannot forge log fields or lines.
"""

from __future__ import annotations

import logging
import sys
import traceback


def quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'


_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}
_level = logging.INFO


def format_line(level: int, msg: str, fields: dict[str, object], trace: str | None = None) -> str:
    parts = [f"level={_LEVEL_NAMES.get(level, 'error')}", f"msg={quote(msg)}"]
    parts += [f"{key}={quote(value)}" for key, value in fields.items()]
    line = "component=policyd " + " ".join(parts)
    if trace is not None:
        line += " traceback=" + quote(trace)
    return line


def setup(level: int = logging.INFO) -> None:
    """Lines at `level` and above go to stderr (journald under systemd), one write each."""
    global _level
    _level = level


def log(level: int, msg: str, fields: dict[str, object], exc: bool = False) -> None:
    # Formatted and written here rather than through the logging module: a line is on the
    # path of every call (audit, export), and this costs a third of a logging.Logger call.
    if level < _level:
        return
    trace = traceback.format_exc().rstrip("\n") if exc else None
    try:
        sys.stderr.write(format_line(level, msg, fields, trace) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # journald's stream gone, stderr closed: a lost line must not fail the operation


def info(msg: str, **fields: object) -> None:
    log(logging.INFO, msg, fields)


def warning(msg: str, **fields: object) -> None:
    log(logging.WARNING, msg, fields)


def error(msg: str, *, exc: bool = False, **fields: object) -> None:
    log(logging.ERROR, msg, fields, exc)
