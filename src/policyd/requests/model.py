"""A VM's export request as policyd keeps it, and its states.

Unprivileged policyd code; no I/O. Everything here was validated (policyd.requests.vmdevice)
before a request was created; the device's `description` is still the VM's own text, which
clients show as untrusted. Its D-Bus face is policyd.bus.interfaces.RequestInterface.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from policyd import modes
from policyd.names import request_path
from policyd.requests.vmdevice import DeviceDescriptor

STATE_PENDING = "pending"
STATE_APPROVING = "approving"
STATE_APPROVED = "approved"
STATE_DENIED = "denied"
STATE_EXPIRED = "expired"
STATE_WITHDRAWN = "withdrawn"
STATE_FAILED = "failed"


@dataclass(eq=False)
class PendingRequest:
    """One request: what the VM asked, what policy said, and how it ended."""

    number: int
    source: str
    source_domid: int
    target: str
    target_domid: int
    device: DeviceDescriptor
    mode: str  # "r" | "w"
    created_us: int
    expires_us: int
    requester: str  # the bridge connection's unique bus name
    location: str  # the policy rule that said "ask"
    state: str = STATE_PENDING
    export: str = "/"  # the Export object, once approved
    backend_path: str = ""
    devid: int = 0
    error: str = ""  # the error name when State is failed (e.g. DeviceChanged)
    timer: asyncio.TimerHandle | None = None

    @property
    def object_path(self) -> str:
        return request_path(self.number)

    @property
    def policy_mode(self) -> str:
        return modes.policy_mode(self.mode)
