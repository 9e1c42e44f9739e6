"""Policy file parser: bounded line reader, rules, and a parser base with `handle_*` hooks.

Trust level: unprivileged. Policy files are trusted (root-owned) but may be wrong; they are
read with a bound (file size, line length), must be UTF-8 without control characters, and
every error becomes a `PolicySyntaxError` carrying `file:line`.

One rule per line, `#` starts a comment (at the start of a line or of a field):

    OPERATION  DEVICE-PATTERN  SOURCE  TARGET  ACTION  [PARAM=VALUE ...]

Subclasses of `AbstractParser` decide what a rule or an error means: the engine's loader
stops at the first error (fail closed from there on), the linter collects them all.
"""

from __future__ import annotations

import os
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PolicySyntaxError
from .tokens import (
    ADMIN_DOMAIN,
    Action,
    DevicePattern,
    DomainSpec,
    Mode,
    parse_action,
    parse_mode,
    parse_operation,
    validate_domain_name,
)

MAX_LINE_LENGTH = 512  # bytes, without the newline
MAX_FILE_SIZE = 1 << 20  # bytes
POLICY_SUFFIX = ".policy"
# File timestamps are coarse (a kernel tick), so an edit within this window of the last read
# may leave size and mtime unchanged; readers re-read files that recent (cf. "racy git").
RACY_WINDOW_NS = 2_000_000_000
_FIELD_SEPARATOR = re.compile(r"[ \t]+")
_PARAM_KEY = re.compile(r"[a-z_]{1,32}")
_FIELDS = "OPERATION DEVICE SOURCE TARGET ACTION [PARAM=VALUE ...]"


@dataclass(frozen=True)
class RuleParams:
    """Parameters of a rule. `mode` is the most a rule grants (None: no cap, rw allowed);
    `default_target` is the target an approval dialog proposes (ask only)."""

    mode: Mode | None = None
    default_target: str | None = None

    def as_dict(self) -> dict[str, str]:
        result: dict[str, str] = {}
        if self.mode is not None:
            result["mode"] = self.mode.value
        if self.default_target is not None:
            result["default_target"] = self.default_target
        return result


# Which parameters each action accepts. deny takes none: it has nothing to parameterise.
_ALLOWED_PARAMS: dict[Action, frozenset[str]] = {
    Action.ALLOW: frozenset({"mode"}),
    Action.ASK: frozenset({"mode", "default_target"}),
    Action.DENY: frozenset(),
}


@dataclass(frozen=True)
class Rule:
    """One parsed policy line, with where it came from."""

    operation: str
    device: DevicePattern
    source: DomainSpec
    target: DomainSpec
    action: Action
    params: RuleParams
    filepath: str
    lineno: int
    text: str = field(compare=False)

    @property
    def location(self) -> str:
        return f"{self.filepath}:{self.lineno}"

    def __str__(self) -> str:
        return self.text


def _parse_params(action: Action, tokens: list[str]) -> RuleParams:
    seen: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(
                f"unexpected field {token[:40]!r}: too many fields (expected {_FIELDS})"
            )
        if not _PARAM_KEY.fullmatch(key):
            raise ValueError(f"invalid parameter name {key[:40]!r}")
        if key not in _ALLOWED_PARAMS[Action.ASK]:
            raise ValueError(f"unknown parameter {key!r} (known: mode, default_target)")
        if key not in _ALLOWED_PARAMS[action]:
            raise ValueError(f"parameter {key!r} is not allowed with action {action.value!r}")
        if key in seen:
            raise ValueError(f"duplicate parameter {key!r}")
        seen[key] = value
    mode = parse_mode(seen["mode"]) if "mode" in seen else None
    default_target = None
    if "default_target" in seen:
        try:
            default_target = validate_domain_name(seen["default_target"])
        except ValueError as err:
            raise ValueError(f"invalid default_target: {err}") from None
        if default_target == ADMIN_DOMAIN:
            raise ValueError("default_target cannot be dom0 (nothing is proposed into dom0)")
    return RuleParams(mode=mode, default_target=default_target)


def parse_rule(line: str, filepath: str, lineno: int) -> Rule | None:
    """Parse one decoded line; None for blank and comment lines.

    Raises `PolicySyntaxError` naming `filepath:lineno`.
    """
    try:
        return _parse_rule(line, filepath, lineno)
    except ValueError as err:
        raise PolicySyntaxError(filepath, lineno, str(err)) from None


def split_fields(line: str) -> list[str]:
    """Split a line on spaces and tabs; a field starting with `#` begins a comment."""
    fields = [f for f in _FIELD_SEPARATOR.split(line.strip(" \t")) if f]
    for i, token in enumerate(fields):
        if token.startswith("#"):
            return fields[:i]
    return fields


def _parse_rule(line: str, filepath: str, lineno: int) -> Rule | None:
    tokens = split_fields(line)
    if not tokens:
        return None
    if len(tokens) < 5:
        raise ValueError(f"too few fields ({len(tokens)}; expected {_FIELDS})")
    operation = parse_operation(tokens[0])
    device = DevicePattern.parse(tokens[1])
    source = DomainSpec.parse(tokens[2])
    target = DomainSpec.parse(tokens[3])
    action = parse_action(tokens[4])
    params = _parse_params(action, tokens[5:])
    if operation == "attach" and action is Action.ASK:
        raise ValueError("ask is not possible for attach (libxl waits for the answer)")
    return Rule(
        operation=operation,
        device=device,
        source=source,
        target=target,
        action=action,
        params=params,
        filepath=filepath,
        lineno=lineno,
        text=" ".join(tokens),
    )


def _check_characters(line: str) -> None:
    for char in line:
        if char == "\t":
            continue
        # Cc: control characters; Cf: format characters such as bidi overrides, which can make
        # a rule look different from what it is (CVE-2021-42574, "Trojan Source").
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise ValueError(f"control or format character U+{ord(char):04X} not allowed")


def iter_lines(data: bytes, filepath: str) -> Iterator[tuple[int, str | PolicySyntaxError]]:
    """Yield (lineno, decoded line or the error in that line) from a file's bytes.

    Lines are bounded and strictly checked (length, UTF-8, control characters). A file larger
    than MAX_FILE_SIZE yields an error at the line that crosses the limit and ends there.
    """
    offset = 0
    for lineno, raw in enumerate(data[: MAX_FILE_SIZE + 1].split(b"\n"), start=1):
        offset += len(raw) + 1
        if offset > MAX_FILE_SIZE + 1:
            yield (
                lineno,
                PolicySyntaxError(filepath, lineno, f"file larger than {MAX_FILE_SIZE} bytes"),
            )
            return
        if len(raw) > MAX_LINE_LENGTH:
            yield (
                lineno,
                PolicySyntaxError(
                    filepath, lineno, f"line too long ({len(raw)} > {MAX_LINE_LENGTH} bytes)"
                ),
            )
            continue
        try:
            line = raw.decode("utf-8")
            _check_characters(line)
        except UnicodeDecodeError as err:
            yield (
                lineno,
                PolicySyntaxError(
                    filepath, lineno, f"not valid UTF-8 (byte {err.start + 1} of the line)"
                ),
            )
            continue
        except ValueError as err:
            yield lineno, PolicySyntaxError(filepath, lineno, str(err))
            continue
        yield lineno, line


def read_bounded(path: Path) -> bytes:
    """Read at most MAX_FILE_SIZE + 1 bytes; raises `PolicySyntaxError` (no line) on OSError."""
    try:
        with open(path, "rb") as file:
            return file.read(MAX_FILE_SIZE + 1)
    except OSError as err:
        raise PolicySyntaxError(str(path), None, f"cannot read: {err.strerror or err}") from None


def list_policy_files(directory: Path) -> list[Path]:
    """The `*.policy` files of a directory in lexical order; hidden files are skipped.

    Raises `PolicySyntaxError` (no line) if the directory cannot be listed.
    """
    try:
        names = os.listdir(directory)
    except OSError as err:
        raise PolicySyntaxError(
            str(directory), None, f"cannot list policy directory: {err.strerror or err}"
        ) from None
    return [
        directory / name
        for name in sorted(names)
        if name.endswith(POLICY_SUFFIX) and not name.startswith(".")
    ]


class AbstractParser(ABC):
    """Feeds rules and errors of policy text to `handle_rule` and `handle_error`.

    `handle_error` returns True to continue with the next line (the linter) or False to stop
    reading this file (the engine, which then stops reading any later file too).
    """

    def parse_bytes(self, data: bytes, filepath: str) -> bool:
        """Parse one file's content; returns False if `handle_error` asked to stop."""
        for lineno, line in iter_lines(data, filepath):
            if isinstance(line, PolicySyntaxError):
                if not self.handle_error(line):
                    return False
                continue
            try:
                rule = parse_rule(line, filepath, lineno)
            except PolicySyntaxError as err:
                if not self.handle_error(err):
                    return False
                continue
            if rule is not None:
                self.handle_rule(rule)
        return True

    def parse_file(self, path: Path) -> bool:
        try:
            data = read_bounded(path)
        except PolicySyntaxError as err:
            self.handle_error(err)
            return False
        return self.parse_bytes(data, str(path))

    @abstractmethod
    def handle_rule(self, rule: Rule) -> None: ...

    @abstractmethod
    def handle_error(self, error: PolicySyntaxError) -> bool: ...


class ValidatingParser(AbstractParser):
    """The linter's parser: collects every rule and every error, never stops at a line error."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.errors: list[PolicySyntaxError] = []

    def handle_rule(self, rule: Rule) -> None:
        self.rules.append(rule)

    def handle_error(self, error: PolicySyntaxError) -> bool:
        self.errors.append(error)
        return True
