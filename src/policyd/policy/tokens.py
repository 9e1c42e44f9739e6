"""The tokens of a policy rule and the validators for request fields.

Trust level: unprivileged. Rule tokens come from trusted (root-owned) policy files but may be
malformed; they raise `ValueError` with a human message, which the parser turns into a
`PolicySyntaxError` carrying `file:line`. Request fields are untrusted: `validate_*` take an
`untrusted_*` string and return it only once it matched a strict, ASCII-only, bounded grammar.

Grammar (see docs/policy.md):

    OPERATION       attach | export | request-export | *
    DEVICE-PATTERN  * | NAME | NAME-PREFIX* | file:/ABS/PATH | file:/ABS/DIR/*
    SOURCE, TARGET  DOMAIN-NAME | dom0 | @adminvm | @anyvm | @tag:TAG | *
    ACTION          allow | deny | ask
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

#: The admin domain. `dom0` in a rule and `@adminvm` both mean this domain.
ADMIN_DOMAIN = "dom0"

OPERATIONS = ("attach", "export", "request-export")

# Explicit ASCII classes and fullmatch everywhere: no \w or \d (they accept Unicode digits
# and letters), no `$` (it accepts a trailing newline).
# The one grammar of domain names (Xen's and Qubes'), used by the daemon's validation too.
DOMAIN_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
DOMAIN_NAME_GRAMMAR = "a letter, then up to 30 of A-Z a-z 0-9 _ . -"
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BLOCK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_BLOCK_PREFIX = re.compile(r"[a-z0-9][a-z0-9_-]{0,30}")
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9_.+-]{1,255}")
MAX_PATH_LENGTH = 255
FILE_PREFIX = "file:"


class Action(enum.Enum):
    """What a rule decides."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


class Mode(enum.Enum):
    """Access mode of an export; `RO` is less than `RW`."""

    RO = "ro"
    RW = "rw"


def validate_domain_name(untrusted_name: str) -> str:
    """A Xen/Qubes domain name: a letter, then letters, digits, `_.-`; at most 31 chars."""
    if not DOMAIN_NAME_RE.fullmatch(untrusted_name):
        raise ValueError(f"invalid domain name {untrusted_name[:40]!r} ({DOMAIN_NAME_GRAMMAR})")
    return untrusted_name


def validate_block_name(untrusted_name: str) -> str:
    """A kernel block device name such as `loop0`, `sda1`, `nvme0n1p2`, `dm-3`, `xvdi`."""
    if not _BLOCK_NAME.fullmatch(untrusted_name):
        raise ValueError(
            f"invalid block device name {untrusted_name[:40]!r} (a-z 0-9 first, then up to "
            "31 of a-z 0-9 _ -)"
        )
    return untrusted_name


def validate_file_path(untrusted_path: str) -> str:
    """An absolute, normalised path: `/`-separated components of `A-Za-z0-9_.+-`, no `.`/`..`."""
    if len(untrusted_path) > MAX_PATH_LENGTH:
        raise ValueError(f"path longer than {MAX_PATH_LENGTH} characters")
    if not untrusted_path.startswith("/"):
        raise ValueError(f"path {untrusted_path[:40]!r} is not absolute")
    for component in untrusted_path[1:].split("/"):
        if component in (".", "..") or not _PATH_COMPONENT.fullmatch(component):
            raise ValueError(
                f"invalid path {untrusted_path[:60]!r} (components of A-Z a-z 0-9 _ . + -, "
                "no empty, '.' or '..' components)"
            )
    return untrusted_path


def validate_device(untrusted_device: str) -> str:
    """A request's device: a block device name (`loop0`) or `file:/absolute/path`."""
    if untrusted_device.startswith(FILE_PREFIX):
        validate_file_path(untrusted_device[len(FILE_PREFIX) :])
        return untrusted_device
    return validate_block_name(untrusted_device)


def parse_operation(token: str) -> str:
    if token != "*" and token not in OPERATIONS:
        raise ValueError(
            f"unknown operation {token[:40]!r} (expected one of {', '.join(OPERATIONS)}, *)"
        )
    return token


def parse_action(token: str) -> Action:
    try:
        return Action(token)
    except ValueError:
        raise ValueError(f"unknown action {token!r} (expected allow, deny or ask)") from None


def parse_mode(token: str) -> Mode:
    try:
        return Mode(token)
    except ValueError:
        raise ValueError(f"invalid mode {token!r} (expected ro or rw)") from None


@dataclass(frozen=True)
class DevicePattern:
    """Which devices a rule covers: everything, one name, a name prefix, a file or a directory.

    A `file:/dir/*` pattern covers every file below /dir at any depth; the requests it is
    compared against are validated first, so they hold no `..` components.
    """

    text: str
    exact: str | None = None
    prefix: str | None = None

    def matches(self, device: str) -> bool:
        """`device` must already be validated (`validate_device`)."""
        if self.exact is not None:
            return device == self.exact
        if self.prefix is not None:
            return device.startswith(self.prefix)
        return True

    @classmethod
    def parse(cls, token: str) -> DevicePattern:
        if token == "*":
            return cls(token)
        if token.startswith(FILE_PREFIX):
            return cls._parse_file(token)
        if "*" in token[:-1] or any(c in token for c in "?[]{}"):
            raise ValueError(
                f"invalid device pattern {token!r}: only '*' or a single trailing '*' is allowed"
            )
        if token.endswith("*"):
            if not _BLOCK_PREFIX.fullmatch(token[:-1]):
                raise ValueError(f"invalid device pattern {token!r} (prefix of a-z 0-9 _ -)")
            return cls(token, prefix=token[:-1])
        try:
            return cls(token, exact=validate_block_name(token))
        except ValueError as err:
            raise ValueError(f"invalid device pattern: {err}") from None

    @classmethod
    def _parse_file(cls, token: str) -> DevicePattern:
        path = token[len(FILE_PREFIX) :]
        if path == "/*":
            return cls(token, prefix=FILE_PREFIX + "/")
        if path.endswith("/*"):
            directory = path[:-2]
            if "*" in directory:
                raise ValueError(f"invalid file pattern {token!r}: '*' only as the last component")
            try:
                validate_file_path(directory)
            except ValueError as err:
                raise ValueError(f"invalid file pattern {token!r}: {err}") from None
            return cls(token, prefix=FILE_PREFIX + directory + "/")
        if "*" in path:
            raise ValueError(
                f"invalid file pattern {token!r}: '*' only as a whole last component ('/dir/*')"
            )
        try:
            validate_file_path(path)
        except ValueError as err:
            raise ValueError(f"invalid file pattern {token!r}: {err}") from None
        return cls(token, exact=token)


#: Returns the tags of a validated domain name; may raise (the engine then denies).
TagLookup = Callable[[str], frozenset[str]]


class DomainKind(enum.Enum):
    ANY = "*"
    ANYVM = "@anyvm"
    ADMINVM = "@adminvm"
    NAME = "name"
    TAG = "@tag:"


@dataclass(frozen=True)
class DomainSpec:
    """A SOURCE or TARGET token.

    `*` is any domain including dom0; `@anyvm` is any domain except dom0 (as in qrexec);
    `@adminvm` and `dom0` are dom0; `@tag:NAME` is any domain the tag provider gives NAME.
    """

    text: str
    kind: DomainKind
    value: str = ""

    def matches(self, domain: str, tags_of: TagLookup) -> bool:
        """`domain` must already be validated. `tags_of` is called only for `@tag:` specs."""
        if self.kind is DomainKind.ANY:
            return True
        if self.kind is DomainKind.ANYVM:
            return domain != ADMIN_DOMAIN
        if self.kind is DomainKind.ADMINVM:
            return domain == ADMIN_DOMAIN
        if self.kind is DomainKind.NAME:
            return domain == self.value
        return self.value in tags_of(domain)

    @property
    def uses_tags(self) -> bool:
        return self.kind is DomainKind.TAG

    @classmethod
    def parse(cls, token: str) -> DomainSpec:
        if token == "*":
            return cls(token, DomainKind.ANY)
        if token == "@anyvm":
            return cls(token, DomainKind.ANYVM)
        if token in ("@adminvm", ADMIN_DOMAIN):
            return cls(token, DomainKind.ADMINVM)
        if token.startswith("@tag:"):
            tag = token[len("@tag:") :]
            if not _TAG.fullmatch(tag):
                raise ValueError(f"invalid tag {tag[:40]!r} (1-64 of A-Z a-z 0-9 _ -)")
            return cls(token, DomainKind.TAG, tag)
        if token.startswith("@"):
            raise ValueError(
                f"unknown domain keyword {token[:40]!r} (expected @anyvm, @adminvm or @tag:NAME)"
            )
        return cls(token, DomainKind.NAME, validate_domain_name(token))


def validate_tag(untrusted_tag: str) -> str:
    if not _TAG.fullmatch(untrusted_tag):
        raise ValueError(f"invalid tag {untrusted_tag[:40]!r} (1-64 of A-Z a-z 0-9 _ -)")
    return untrusted_tag


def device_for_path(untrusted_path: str) -> str:
    """The request `device` for a path: `/dev/loop0` -> `loop0`, `/srv/a.img` -> `file:/srv/a.img`.

    Other paths under /dev (`/dev/mapper/x`, `/dev/disk/by-id/...`) are symlinks or
    aliases; they raise ValueError: pass the kernel name of the device actually opened.
    """
    if untrusted_path.startswith("/dev/"):
        return validate_block_name(untrusted_path[len("/dev/") :])
    return FILE_PREFIX + validate_file_path(untrusted_path)
