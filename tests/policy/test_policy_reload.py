"""Live reload: PolicyWatcher picks up edits, new and removed files; a bad edit denies from its
line on and never raises; fixing it restores the rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyd.policy import Action, Policy, PolicyWatcher, Request, TagProvider, no_tags

REQ = Request("export", "loop0", "dom0", "work", "ro")


def test_reload_picks_up_change_bad_edit_and_fix(tmp_path: Path) -> None:
    policy_file = tmp_path / "50-test.policy"
    policy_file.write_text("export * dom0 work allow\n")
    watcher = PolicyWatcher(tmp_path)
    assert watcher.evaluate(REQ).action is Action.ALLOW

    policy_file.write_text("export * dom0 work deny\n")
    assert watcher.evaluate(REQ).action is Action.DENY

    policy_file.write_text("export * dom0 work allow\nexport * dom0 work ???\n")
    decision = watcher.evaluate(REQ)
    assert decision.action is Action.ALLOW  # the rule before the error still applies
    other = watcher.evaluate(Request("export", "loop0", "dom0", "vault", "ro"))
    assert other.action is Action.DENY and other.location == f"{policy_file}:2"

    policy_file.write_text("export * dom0 work ???\n")
    decision = watcher.evaluate(REQ)
    assert decision.action is Action.DENY and decision.location == f"{policy_file}:1"

    policy_file.write_text("export * dom0 @anyvm allow\n")
    assert watcher.evaluate(REQ).action is Action.ALLOW
    assert watcher.policy.error is None


def test_same_size_edit_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    policy_file = tmp_path / "50.policy"
    policy_file.write_text("export * dom0 work allow\n")
    watcher = PolicyWatcher(tmp_path)
    st = policy_file.stat()
    policy_file.write_text("export * dom0 work ask  \n")  # same size
    os.utime(policy_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert watcher.evaluate(REQ).action is Action.ASK


def test_new_and_removed_files(tmp_path: Path) -> None:
    (tmp_path / "50.policy").write_text("export * dom0 work allow\n")
    watcher = PolicyWatcher(tmp_path)
    (tmp_path / "10.policy").write_text("export * dom0 work deny\n")
    assert watcher.reload_if_changed()
    assert watcher.evaluate(REQ).action is Action.DENY
    (tmp_path / "10.policy").unlink()
    assert watcher.evaluate(REQ).action is Action.ALLOW
    (tmp_path / "50.policy").rename(tmp_path / "50.policy.disabled")
    decision = watcher.evaluate(REQ)
    assert decision.action is Action.DENY and decision.reason == "no rule matched: deny"


def test_unchanged_old_files_are_not_reloaded(tmp_path: Path) -> None:
    policy_file = tmp_path / "50.policy"
    policy_file.write_text("export * dom0 work allow\n")
    os.utime(policy_file, (1_000_000, 1_000_000))  # long before the racy window
    watcher = PolicyWatcher(tmp_path)
    assert watcher.reload_if_changed() is False
    before = watcher.policy
    assert watcher.reload_if_changed() is False
    assert watcher.policy is before


def test_directory_removed_and_recreated(tmp_path: Path) -> None:
    directory = tmp_path / "policy.d"
    directory.mkdir()
    (directory / "50.policy").write_text("export * dom0 work allow\n")
    watcher = PolicyWatcher(directory)
    (directory / "50.policy").unlink()
    directory.rmdir()
    decision = watcher.evaluate(REQ)
    assert decision.action is Action.DENY and decision.location == str(directory)
    directory.mkdir()
    (directory / "50.policy").write_text("export * dom0 work allow\n")
    assert watcher.evaluate(REQ).action is Action.ALLOW


def test_watcher_on_missing_directory_denies(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path / "absent")
    assert watcher.evaluate(REQ).action is Action.DENY


def test_change_during_load_is_read_at_next_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_file = tmp_path / "50.policy"

    def write(text: str, mtime: int) -> None:
        policy_file.write_text(text)
        os.utime(policy_file, (mtime, mtime))  # old timestamps: outside the racy window

    write("export * dom0 work allow\n", 1_000_000)
    watcher = PolicyWatcher(tmp_path)
    real_load_dir = Policy.load_dir

    def load_then_edit(directory: Path, tags: TagProvider = no_tags) -> Policy:
        loaded = real_load_dir(directory, tags)
        write("export * dom0 work deny\n", 3_000_000)  # an edit lands right after the read
        return loaded

    write("export * dom0 work ask\n", 2_000_000)
    monkeypatch.setattr(Policy, "load_dir", load_then_edit)
    assert watcher.reload_if_changed()
    monkeypatch.undo()
    assert watcher.policy.rules[0].action is Action.ASK
    assert watcher.evaluate(REQ).action is Action.DENY


def _old(path: Path) -> None:
    os.utime(path, (1_000_000, 1_000_000))  # long before the racy window


def test_quiet_directory_costs_no_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With inotify, a check while nothing changed lists and stats nothing; a change is still
    seen at the very next check."""
    policy_file = tmp_path / "50.policy"
    policy_file.write_text("export * dom0 work allow\n")
    _old(policy_file)
    watcher = PolicyWatcher(tmp_path)
    assert watcher.reload_if_changed() is False  # settles the first load's watch

    def no_listing(path: object) -> list[str]:
        raise AssertionError("listed the policy directory while nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(os, "listdir", no_listing)
        for _ in range(3):
            assert watcher.evaluate(REQ).action is Action.ALLOW
    policy_file.write_text("export * dom0 work deny\n")
    _old(policy_file)
    assert watcher.evaluate(REQ).action is Action.DENY


def test_symlinked_file_whose_target_changes(tmp_path: Path) -> None:
    """A policy file may be a symlink to a file elsewhere: an edit of the target counts."""
    directory, elsewhere = tmp_path / "policy.d", tmp_path / "shared"
    directory.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "rules"
    target.write_text("export * dom0 work allow\n")
    _old(target)
    (directory / "50.policy").symlink_to(target)
    watcher = PolicyWatcher(directory)
    assert watcher.reload_if_changed() is False
    target.write_text("export * dom0 work deny\n")
    _old(target)
    assert watcher.evaluate(REQ).action is Action.DENY


def test_without_inotify_every_check_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from policyd.policy import changes

    monkeypatch.setattr(changes, "_LIBC", None)
    policy_file = tmp_path / "50.policy"
    policy_file.write_text("export * dom0 work allow\n")
    _old(policy_file)
    watcher = PolicyWatcher(tmp_path)
    assert watcher.evaluate(REQ).action is Action.ALLOW
    policy_file.write_text("export * dom0 work deny\n")
    _old(policy_file)
    assert watcher.evaluate(REQ).action is Action.DENY
