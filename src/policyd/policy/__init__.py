"""blockbroker's policy engine: text policy files, first match wins, no match denies.

Trust level: unprivileged; policy files are trusted (root-owned), request fields are untrusted.

    from policyd.policy import Policy, PolicyWatcher, Request, FileTagProvider

    watcher = PolicyWatcher("/etc/blockbroker/policy.d", tags=FileTagProvider(path))
    decision = watcher.evaluate(Request("request-export", "loop0", "sys-usb", "work", "ro"))
    decision.action, decision.location, decision.reason

See docs/policy.md for the file format and the API.
"""

from .engine import DEFAULT_POLICY_DIR, Decision, Policy, PolicyWatcher, Request
from .errors import (
    AccessDenied,
    InvalidRequest,
    PolicyError,
    PolicySyntaxError,
    TagLookupError,
    TagsSyntaxError,
)
from .lint import Shadowed, find_shadowed
from .parser import Rule, RuleParams, ValidatingParser, list_policy_files
from .tags import FileTagProvider, StaticTagProvider, TagProvider, no_tags
from .tokens import (
    ADMIN_DOMAIN,
    DOMAIN_NAME_GRAMMAR,
    DOMAIN_NAME_RE,
    OPERATIONS,
    Action,
    Mode,
    device_for_path,
)

__all__ = [
    "ADMIN_DOMAIN",
    "DEFAULT_POLICY_DIR",
    "DOMAIN_NAME_GRAMMAR",
    "DOMAIN_NAME_RE",
    "OPERATIONS",
    "AccessDenied",
    "Action",
    "Decision",
    "FileTagProvider",
    "InvalidRequest",
    "Mode",
    "Policy",
    "PolicyError",
    "PolicySyntaxError",
    "PolicyWatcher",
    "Request",
    "Rule",
    "RuleParams",
    "Shadowed",
    "StaticTagProvider",
    "TagLookupError",
    "TagProvider",
    "TagsSyntaxError",
    "ValidatingParser",
    "device_for_path",
    "find_shadowed",
    "list_policy_files",
    "no_tags",
]
