"""The policy engine: load rules, evaluate requests, reload when the files change.

Trust level: unprivileged; policy files are trusted (root-owned), request fields are untrusted.
Every request field is validated in `_validate_request` before any rule sees it; an invalid
request, a broken policy, a failing tag provider or an internal error all end in "deny":
`Policy.evaluate` never raises.

Semantics: files `*.policy` of a directory in lexical order, first matching rule wins, no match
denies. A syntax error stops loading at that line: rules before it (in that file and earlier
files) still decide, everything that would have been decided from there on is denied, and the
decision names the error's `file:line`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .changes import ChangeFeed
from .errors import InvalidRequest, PolicySyntaxError
from .parser import RACY_WINDOW_NS, AbstractParser, Rule, RuleParams, list_policy_files
from .tags import TagProvider, no_tags
from .tokens import (
    ADMIN_DOMAIN,
    OPERATIONS,
    Action,
    Mode,
    TagLookup,
    validate_device,
    validate_domain_name,
)

DEFAULT_POLICY_DIR = Path("/etc/blockbroker/policy.d")
_NO_PARAMS = RuleParams()


@dataclass(frozen=True)
class Request:
    """What is asked. All fields are untrusted until `Policy.evaluate` validates them.

    operation: attach | export | request-export
    device:    a block device name (`loop0`, `sda1`) or `file:/absolute/path`
    source:    the backend domain (the domain that owns the device), e.g. `dom0`, `sys-usb`
    target:    the frontend domain that would see the disk
    mode:      `ro` or `rw` (a `Mode` is accepted too)
    """

    operation: str
    device: str
    source: str
    target: str
    mode: str | Mode = Mode.RW


@dataclass(frozen=True)
class _ValidRequest:
    operation: str
    device: str
    source: str
    target: str
    mode: Mode


@dataclass(frozen=True)
class Decision:
    """The answer. `rule` and `location` say which rule (or which syntax error) decided."""

    action: Action
    rule: Rule | None
    location: str | None
    params: RuleParams
    reason: str

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    def explain(self) -> str:
        """Human-readable: the decision, the deciding rule with its file:line, and why."""
        lines = [f"decision: {self.action.value}"]
        if self.rule is not None:
            lines.append(f"rule: {self.rule.location}: {self.rule.text}")
        elif self.location is not None:
            lines.append(f"at: {self.location}")
        lines.append(f"reason: {self.reason}")
        return "\n".join(lines)


def _deny(reason: str, rule: Rule | None = None, location: str | None = None) -> Decision:
    params = rule.params if rule is not None else _NO_PARAMS
    if rule is not None and location is None:
        location = rule.location
    return Decision(Action.DENY, rule, location, params, reason)


def _validate_request(untrusted: Request) -> _ValidRequest:
    """The one place request fields are validated; raises `InvalidRequest`."""
    fields = (untrusted.operation, untrusted.device, untrusted.source, untrusted.target)
    if not all(isinstance(f, str) for f in fields):
        raise InvalidRequest("request fields must be strings")
    if untrusted.operation not in OPERATIONS:
        raise InvalidRequest(f"unknown operation {untrusted.operation[:40]!r}")
    untrusted_mode = untrusted.mode
    if isinstance(untrusted_mode, Mode):
        mode = untrusted_mode
    elif isinstance(untrusted_mode, str) and untrusted_mode in ("ro", "rw"):
        mode = Mode(untrusted_mode)
    else:
        raise InvalidRequest("mode must be ro or rw")
    try:
        device = validate_device(untrusted.device)
        source = validate_domain_name(untrusted.source)
        target = validate_domain_name(untrusted.target)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if untrusted.operation == "request-export" and device.startswith("file:"):
        raise InvalidRequest("a VM can only export block devices, not files")
    return _ValidRequest(untrusted.operation, device, source, target, mode)


def _cached_lookup(provider: TagProvider) -> TagLookup:
    """Ask the provider at most once per domain within one evaluation."""
    cache: dict[str, frozenset[str]] = {}

    def lookup(domain: str) -> frozenset[str]:
        if domain not in cache:
            cache[domain] = frozenset(t for t in provider(domain) if isinstance(t, str))
        return cache[domain]

    return lookup


def _matches(rule: Rule, request: _ValidRequest, tags_of: TagLookup) -> bool:
    return (
        rule.operation in ("*", request.operation)
        and rule.device.matches(request.device)
        and rule.source.matches(request.source, tags_of)
        and rule.target.matches(request.target, tags_of)
    )


def _apply(rule: Rule, request: _ValidRequest) -> Decision:
    if rule.action is Action.DENY:
        return _deny("denied by rule", rule)
    if rule.action is Action.ASK and request.operation == "attach":
        return _deny("ask is not possible for attach (libxl waits for the answer): deny", rule)
    if rule.params.mode is Mode.RO and request.mode is Mode.RW:
        return _deny("rule grants at most mode=ro but rw was requested: deny", rule)
    reason = "allowed by rule" if rule.action is Action.ALLOW else "rule asks a person to approve"
    return Decision(rule.action, rule, rule.location, rule.params, reason)


class _LoadingParser(AbstractParser):
    """The engine's parser: keeps rules up to the first error, then stops (fail closed)."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.error: PolicySyntaxError | None = None

    def handle_rule(self, rule: Rule) -> None:
        self.rules.append(rule)

    def handle_error(self, error: PolicySyntaxError) -> bool:
        self.error = error
        return False


class Policy:
    """An immutable set of rules plus, if loading stopped early, the syntax error that stopped it.

    Build one with `from_string` (tests), `load_dir` (production) or `load_files`.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        error: PolicySyntaxError | None = None,
        files: Sequence[str] = (),
        tags: TagProvider = no_tags,
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.error = error
        self.files: tuple[str, ...] = tuple(files)
        self.tags = tags

    @classmethod
    def from_string(cls, text: str, name: str = "<string>", tags: TagProvider = no_tags) -> Policy:
        parser = _LoadingParser()
        # surrogatepass: a lone surrogate becomes invalid UTF-8 and so a syntax error.
        parser.parse_bytes(text.encode("utf-8", "surrogatepass"), name)
        return cls(parser.rules, parser.error, (name,), tags)

    @classmethod
    def load_files(
        cls, paths: Iterable[str | os.PathLike[str]], tags: TagProvider = no_tags
    ) -> Policy:
        parser = _LoadingParser()
        files: list[str] = []
        for path in paths:
            files.append(str(path))
            if not parser.parse_file(Path(path)):
                break
        return cls(parser.rules, parser.error, files, tags)

    @classmethod
    def load_dir(
        cls, directory: str | os.PathLike[str] = DEFAULT_POLICY_DIR, tags: TagProvider = no_tags
    ) -> Policy:
        """Load `directory/*.policy` in lexical order. Never raises: a missing or unreadable
        directory gives a policy that denies everything and names the directory."""
        try:
            paths = list_policy_files(Path(directory))
        except PolicySyntaxError as err:
            return cls((), err, (), tags)
        return cls.load_files(paths, tags)

    def evaluate(self, request: Request) -> Decision:
        """Decide a request. Never raises; anything unexpected is a deny."""
        try:
            return self._evaluate(request)
        except Exception as err:  # fail closed, whatever went wrong
            return _deny(f"internal error while evaluating ({type(err).__name__}): deny")

    def _evaluate(self, untrusted_request: Request) -> Decision:
        try:
            request = _validate_request(untrusted_request)
        except InvalidRequest as err:
            return _deny(f"invalid request: {err}")
        if request.operation == "request-export" and request.target == ADMIN_DOMAIN:
            return _deny("a VM's device is never exported to dom0 (built in): deny")
        tags_of = _cached_lookup(self.tags)
        for rule in self.rules:
            try:
                matched = _matches(rule, request, tags_of)
            except Exception as err:
                return _deny(f"tag lookup failed ({err}): deny", rule)
            if matched:
                return _apply(rule, request)
        if self.error is not None:
            return _deny(
                "no rule before the syntax error matched, and everything from it on is denied: "
                f"{self.error}",
                location=self.error.location,
            )
        return _deny("no rule matched: deny")


# A file's identity and content version, as cheap stat fields.
_Signature = tuple[object, ...]


class PolicyWatcher:
    """A policy directory that reloads itself when its files change (checked on each call).

    `reload_if_changed()` compares the directory listing and every file's device, inode, size,
    mtime and ctime with the last load (one listdir and one stat per file), but only after an
    inotify event, or while a file is young enough for its mtime to be ambiguous, or where
    inotify is unavailable; otherwise a check is one non-blocking read. A bad edit
    is loaded like any other (it denies from the error on); nothing here raises.
    """

    def __init__(
        self, directory: str | os.PathLike[str] = DEFAULT_POLICY_DIR, tags: TagProvider = no_tags
    ) -> None:
        self.directory = Path(directory)
        self.tags = tags
        self._signature: _Signature = ()
        self._loaded_at_ns = 0
        self._changes = ChangeFeed()
        self.policy = Policy((), None, (), tags)
        self.reload_if_changed()

    def _current_signature(self) -> _Signature:
        def stat_fields(path: Path) -> tuple[object, ...]:
            try:
                st = os.stat(path)
            except OSError as err:
                return (str(path), "error", err.errno)
            return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

        try:
            files = list_policy_files(self.directory)
        except PolicySyntaxError as err:
            return (stat_fields(self.directory), str(err))
        return (stat_fields(self.directory), *(stat_fields(p) for p in files))

    def _watched_paths(self) -> list[Path]:
        try:
            return [self.directory, *list_policy_files(self.directory)]
        except PolicySyntaxError:
            return [self.directory]

    def _newest_file_mtime_ns(self) -> int:
        # The directory's own entry (first) is left out: adding, removing or renaming files
        # changes the listing or an inode anyway.
        files = self._signature[1:]
        return max(
            (int(f[4]) for f in files if isinstance(f, tuple) and len(f) == 6),
            default=0,
        )

    def reload_if_changed(self) -> bool:
        """Reload if any file changed; True if the loaded rules or error differ from before.

        With inotify (`ChangeFeed`) nothing is stat'ed while no event came since the last
        check and no file is young enough for its mtime to be ambiguous."""
        racy = self._newest_file_mtime_ns() >= self._loaded_at_ns - RACY_WINDOW_NS
        if not racy and self._changes.quiet():
            return False
        try:
            self._changes.watch(self._watched_paths())  # before reading: no change is missed
            signature = self._current_signature()
            if signature == self._signature and not racy:
                return False
            loaded_at_ns = time.time_ns()
            # The signature was taken before reading: a change during the read shows up as a
            # different signature at the next check.
            new = Policy.load_dir(self.directory, self.tags)
        except Exception as err:  # never crash the daemon over a policy problem
            new = Policy((), PolicySyntaxError(str(self.directory), None, f"reload failed: {err}"))
            signature, loaded_at_ns = (), 0
            self._changes.close()  # retried at the next call
        old = self.policy
        self._signature, self._loaded_at_ns, self.policy = signature, loaded_at_ns, new
        return (new.rules, str(new.error), new.files) != (old.rules, str(old.error), old.files)

    def evaluate(self, request: Request) -> Decision:
        """Reload if needed, then decide."""
        self.reload_if_changed()
        return self.policy.evaluate(request)
