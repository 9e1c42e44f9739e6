"""Every exception the policy engine raises, in one place.

Trust level: unprivileged (runs inside policyd and the `blockbroker policy` CLI). Policy and
tags files are trusted (root-owned) but may be wrong; request fields are untrusted.

A syntax error is an access denial: `PolicySyntaxError` derives from `AccessDenied`, and the
engine turns it into "deny" for every request the broken part of the policy would have decided.
Each syntax error names `file:line`.
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of everything the policy engine raises."""


class AccessDenied(PolicyError):
    """A request is denied; the message says why."""


class PolicySyntaxError(AccessDenied):
    """A policy (or tags) file is malformed at `filepath:lineno`.

    `lineno` is 1-based; it is None only for errors about a whole file or directory that has
    no line to point at (it cannot be opened, the directory does not exist).
    """

    def __init__(self, filepath: str, lineno: int | None, msg: str) -> None:
        self.filepath = filepath
        self.lineno = lineno
        self.msg = msg
        super().__init__(f"{self.location}: {msg}")

    @property
    def location(self) -> str:
        """`file:line`, or just `file` when there is no line."""
        if self.lineno is None:
            return self.filepath
        return f"{self.filepath}:{self.lineno}"


class TagsSyntaxError(PolicySyntaxError):
    """A tags file is malformed at `filepath:lineno`."""


class TagLookupError(PolicyError):
    """A tag provider could not say which tags a domain has; rules that need tags deny."""


class InvalidRequest(PolicyError):
    """A request field failed validation; the engine answers such a request with deny."""
