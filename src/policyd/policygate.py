"""The policy gate: the export policy as policyd applies it to attach, export and requests.

Unprivileged policyd code. Request fields reach the policy engine (policyd.policy, a library
with no daemon code) unvalidated on purpose: the engine validates them itself and denies what it
cannot parse (fail closed). Every decision is audited (policyd.audit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from policyd import errors, logfmt, modes
from policyd.audit import audit
from policyd.policy import (
    ADMIN_DOMAIN,
    Action,
    Decision,
    PolicyWatcher,
    Request,
    TagProvider,
    device_for_path,
    no_tags,
)

DomainName = Callable[[int], Awaitable[str]]  # a domain's XenStore name by domid


def policy_name(domid: int, xenstore_name: str) -> str:
    """The policy's name for a domain: `dom0` for domid 0, else its XenStore name."""
    return ADMIN_DOMAIN if domid == 0 else xenstore_name


class PolicyGate:
    """Evaluates the export policy for attach, export and request-export, and audits it."""

    def __init__(
        self, policy_dir: str | Path, domain_name: DomainName, tags: TagProvider = no_tags
    ) -> None:
        self.watcher = PolicyWatcher(policy_dir, tags)
        self.domain_name = domain_name
        if self.watcher.policy.error is not None:
            logfmt.warning("policy has an error; it denies from there on", error=self.error_text)

    @property
    def error_text(self) -> str:
        return str(self.watcher.policy.error)

    async def name_of(self, domid: int) -> str:
        """The policy's name for a domain: `dom0` for domid 0, else its XenStore name."""
        return policy_name(domid, "" if domid == 0 else await self.domain_name(domid))

    def evaluate(
        self, operation: str, device: str, source: str, target: str, mode: str
    ) -> Decision:
        if self.watcher.reload_if_changed():
            logfmt.info("policy reloaded", dir=self.watcher.directory, error=self.error_text)
        return self.watcher.policy.evaluate(Request(operation, device, source, target, mode))

    async def check_path(
        self,
        operation: str,
        path: str,
        backend: tuple[int, str],
        frontend: tuple[int, str],
        writable: bool,
    ) -> None:
        """attach/export of a dom0 path: allow, or PolicyDenied naming the deciding rule.

        backend and frontend are (domid, name as the caller just read it from XenStore, "" if
        none), so the check costs no XenStore round trip of its own. `ask` cannot be honoured
        here (the caller is already an authorized admin or libxl, who waits synchronously), so
        only `allow` passes.
        """
        try:
            device = device_for_path(path)
        except ValueError:
            device = path  # the engine denies it as an invalid request, with the reason
        source = policy_name(*backend)
        target = policy_name(*frontend)
        mode = modes.policy_mode(modes.from_writable(writable))
        decision = self.evaluate(operation, device, source, target, mode)
        self.enforce(decision, operation, device, source, target, mode, allow=(Action.ALLOW,))

    def enforce(
        self,
        decision: Decision,
        operation: str,
        device: str,
        source: str,
        target: str,
        mode: str,
        *,
        allow: tuple[Action, ...],
        diskseq: int | None = None,
    ) -> Decision:
        """Audit `decision`; raise PolicyDenied unless its action is one of `allow`."""
        result = "allow" if decision.action in allow else "deny"
        audit(
            result if decision.action is not Action.ASK or result == "deny" else "ask",
            operation=operation,
            device=device,
            diskseq="" if diskseq is None else diskseq,
            source=source,
            target=target,
            mode=mode,
            decided_by=f"rule {decision.location}" if decision.location else "policy",
            reason=decision.reason,
        )
        if result == "deny":
            where = decision.location or "no rule"
            reason = decision.reason
            if decision.action is Action.ASK:
                reason = f"the rule asks a person, which {operation} cannot wait for: deny"
            raise errors.PolicyDenied(
                f"{operation} of {device} from {source} to {target} ({mode}) is denied by the "
                f"export policy at {where}: {reason}"
            )
        return decision
