"""Named errors of the D-Bus API (org.qubes.BlockBroker1.Error.*).

Unprivileged policyd code; no I/O. Every failure a caller can see is one of these classes; the
message says what happened and what to do. Anything else that escapes a handler is logged and
answered as a bare Error.Internal (no traceback on the wire).
"""

from __future__ import annotations

from typing import ClassVar

from policyd.names import ERROR_PREFIX


class PolicydError(Exception):
    """Base class: `name` is the last part of the D-Bus error name."""

    name: ClassVar[str] = "Internal"

    @property
    def dbus_name(self) -> str:
        return ERROR_PREFIX + self.name

    @property
    def text(self) -> str:
        return str(self) or self.name


class AccessDenied(PolicydError):
    name = "AccessDenied"


class UnknownDomain(PolicydError):
    name = "UnknownDomain"


class NotFound(PolicydError):
    name = "NotFound"


class InvalidArgument(PolicydError):
    name = "InvalidArgument"


class Refused(PolicydError):
    """The broker refused the path (outside its roots, symlink, major not allowed, ...)."""

    name = "Refused"


class Busy(PolicydError):
    """A devid is in use, or a read-write/read-only conflict on the same backing."""

    name = "Busy"


class DeviceChanged(PolicydError):
    """Identity (major:minor, diskseq, backing file) is not the one expected."""

    name = "DeviceChanged"


class XenStoreError(PolicydError):
    name = "XenStore"


class CommitUnknown(XenStoreError):
    """The connection failed during a transaction's commit: it may or may not have been
    applied. Whatever it wrote may name a device, so the caller must keep that device's fd."""


class BrokerUnavailable(PolicydError):
    name = "BrokerUnavailable"


class PolicyDenied(PolicydError):
    name = "PolicyDenied"


class Expired(PolicydError):
    name = "Expired"


class Internal(PolicydError):
    name = "Internal"
