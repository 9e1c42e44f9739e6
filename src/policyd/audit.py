"""The audit trail: who the current call comes from, and one log line per decision.

Unprivileged policyd code. Every decision - by a policy rule or by a person - is logged as one
logfmt line with `event=audit`: who asked, which device (with diskseq where known), which rule or
person decided, and the result. Callers' identities come from the bus daemon or from the block
socket's SO_PEERCRED (set per call by policyd.bus.service), never from message bodies.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from policyd import logfmt


@dataclass(frozen=True)
class Caller:
    """Who the current call comes from: on D-Bus, as the bus daemon says (uid, unique name);
    on the block socket (policyd.bus.blocksocket), as the kernel says (SO_PEERCRED: uid, pid;
    no bus name)."""

    uid: int
    bus_name: str
    pid: int | None = None  # the block socket's peer

    def __str__(self) -> str:
        if self.pid is not None:
            return f"uid={self.uid} pid={self.pid} via=block-socket"
        return f"uid={self.uid} bus={self.bus_name}"


# Set by policyd.bus.service for each method call, whatever its transport (each call runs in
# its own task, so its own context).
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def audit(result: str, **fields: object) -> None:
    """One audit line: `event=audit result=... ` plus what was decided and by whom."""
    caller = CALLER.get()
    fields.setdefault("caller", "policyd" if caller is None else str(caller))
    logfmt.info("decision", event="audit", result=result, **fields)
