"""logfmt-style logging to stderr for policyd.

Unprivileged policyd code. Values that come from callers are quoted and escaped here, so a caller
cannot forge log fields or lines.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "policyd"


def quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, "fields", {})
        parts = [f"level={record.levelname.lower()}", f"msg={quote(record.getMessage())}"]
        parts += [f"{key}={quote(value)}" for key, value in fields.items()]
        line = "component=policyd " + " ".join(parts)
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += " traceback=" + quote(trace)
        return line


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def log(level: int, msg: str, fields: dict[str, object], exc: bool = False) -> None:
    logging.getLogger(LOGGER_NAME).log(level, msg, exc_info=exc, extra={"fields": fields})


def info(msg: str, **fields: object) -> None:
    log(logging.INFO, msg, fields)


def warning(msg: str, **fields: object) -> None:
    log(logging.WARNING, msg, fields)


def error(msg: str, *, exc: bool = False, **fields: object) -> None:
    log(logging.ERROR, msg, fields, exc)
