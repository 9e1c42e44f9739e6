"""Tag providers: which tags a domain has, for `@tag:NAME` in policy rules.

Trust level: unprivileged. The tags file is trusted (root-owned) but may be wrong; domain names
given to a provider have been validated by the engine.

A provider is any callable `(domain) -> Iterable[str]`. It may raise; the engine then denies
every request that reaches a rule needing that domain's tags (fail closed). policyd may supply
one reading XenStore; `FileTagProvider` reads a tags file, one domain per line:

    # DOMAIN  TAG [TAG ...]
    sys-usb   usb-source trusted-exporter
    work      storage-target

A domain may appear on several lines; its tags are the union. Errors carry `file:line`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import TagLookupError, TagsSyntaxError
from .parser import RACY_WINDOW_NS, iter_lines, read_bounded, split_fields
from .tokens import validate_domain_name, validate_tag

TagProvider = Callable[[str], Iterable[str]]


def no_tags(domain: str) -> frozenset[str]:
    """The provider for deployments without tags: no domain has any tag."""
    return frozenset()


def parse_tags(
    data: bytes, filepath: str
) -> tuple[dict[str, frozenset[str]], list[TagsSyntaxError]]:
    """Parse a tags file's bytes into {domain: tags}, plus every error found."""
    tags: dict[str, set[str]] = {}
    errors: list[TagsSyntaxError] = []
    for lineno, line in iter_lines(data, filepath):
        if not isinstance(line, str):
            errors.append(TagsSyntaxError(filepath, lineno, line.msg))
            continue
        fields = split_fields(line)
        if not fields:
            continue
        try:
            if len(fields) < 2:
                raise ValueError("too few fields (expected DOMAIN TAG [TAG ...])")
            domain = validate_domain_name(fields[0])
            new_tags = [validate_tag(tag) for tag in fields[1:]]
        except ValueError as err:
            errors.append(TagsSyntaxError(filepath, lineno, str(err)))
            continue
        tags.setdefault(domain, set()).update(new_tags)
    return {domain: frozenset(values) for domain, values in tags.items()}, errors


class FileTagProvider:
    """Tags from a file, re-read whenever its inode, size, mtime or ctime changes (and on
    every lookup while the file is younger than RACY_WINDOW_NS at the last read).

    A missing, unreadable or malformed file makes every lookup raise `TagLookupError`, so the
    engine denies instead of silently treating a domain as untagged.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._signature: tuple[int, ...] | None = None
        self._tags: dict[str, frozenset[str]] = {}
        self._error: str | None = "not loaded"
        self._loaded_at_ns = 0

    def errors(self) -> list[TagsSyntaxError]:
        """Read the file now and return its errors (for the linter)."""
        try:
            data = read_bounded(self.path)
        except Exception as err:
            return [TagsSyntaxError(str(self.path), None, getattr(err, "msg", str(err)))]
        return parse_tags(data, str(self.path))[1]

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError as err:
            self._signature = None
            self._error = f"{self.path}: {err.strerror or err}"
            return
        racy = st.st_mtime_ns >= self._loaded_at_ns - RACY_WINDOW_NS
        if signature == self._signature and not racy:
            return
        self._signature, self._loaded_at_ns = signature, time.time_ns()
        try:
            data = read_bounded(self.path)
        except Exception as err:
            self._error = str(err)
            return
        tags, errors = parse_tags(data, str(self.path))
        self._tags = tags
        self._error = str(errors[0]) if errors else None

    def __call__(self, domain: str) -> frozenset[str]:
        self._refresh()
        if self._error is not None:
            raise TagLookupError(f"tags file unusable: {self._error}")
        return self._tags.get(domain, frozenset())


class StaticTagProvider:
    """Tags from a mapping; for tests and for callers that already know the tags."""

    def __init__(self, tags: dict[str, Iterable[str]]) -> None:
        self._tags = {domain: frozenset(values) for domain, values in tags.items()}

    def __call__(self, domain: str) -> frozenset[str]:
        return self._tags.get(domain, frozenset())
