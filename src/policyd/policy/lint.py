"""Checks beyond syntax for `blockbroker policy lint`: rules that can never decide anything.

Trust level: unprivileged; works on already-parsed rules from trusted policy files.

A rule is shadowed when an earlier rule matches every request it matches; first match wins,
so the later rule is dead (whatever the mode, the earlier rule decides). The check is
conservative: it only reports what holds for every tag assignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .parser import Rule
from .tokens import DevicePattern, DomainKind, DomainSpec


@dataclass(frozen=True)
class Shadowed:
    rule: Rule
    by: Rule

    def __str__(self) -> str:
        return (
            f"{self.rule.location}: warning: rule never matches: every request it covers is "
            f"decided earlier by {self.by.location}"
        )


def _device_covers(a: DevicePattern, b: DevicePattern) -> bool:
    if a.exact is not None:
        return b.exact == a.exact
    if a.prefix is not None:
        inner = b.exact if b.exact is not None else b.prefix
        return inner is not None and inner.startswith(a.prefix)
    return True  # a is `*`


def _domain_covers(a: DomainSpec, b: DomainSpec) -> bool:
    if a.kind is DomainKind.ANY:
        return True
    if a.kind is DomainKind.ANYVM:
        # dom0 parses to ADMINVM, so every NAME is a VM other than dom0
        return b.kind in (DomainKind.ANYVM, DomainKind.NAME)
    return a.kind is b.kind and a.value == b.value


def covers(a: Rule, b: Rule) -> bool:
    """True if `a` matches every request `b` matches."""
    return (
        a.operation in ("*", b.operation)
        and _device_covers(a.device, b.device)
        and _domain_covers(a.source, b.source)
        and _domain_covers(a.target, b.target)
    )


def find_shadowed(rules: Sequence[Rule]) -> list[Shadowed]:
    """Every rule covered by an earlier one, with the first such earlier rule."""
    found: list[Shadowed] = []
    for i, rule in enumerate(rules):
        for earlier in rules[:i]:
            if covers(earlier, rule):
                found.append(Shadowed(rule, earlier))
                break
    return found
