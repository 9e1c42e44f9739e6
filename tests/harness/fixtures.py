"""pytest fixtures for the host stack. Test harness, runs as root.

Use from a test directory's conftest.py (tests/ is on sys.path, so `harness` imports):

    from harness.fixtures import stack, stack_config, stack_factory  # noqa: F401

`stack` is module-scoped and built from `stack_config`, which a module or conftest overrides:

    @pytest.fixture(scope="module")
    def stack_config() -> StackConfig:
        return StackConfig(domains={"work": 1}, policyd=False)

`stack_factory(config)` starts extra stacks inside one test. Every stack is torn down after its
scope; a leak (a loop device under the stack's dirs, a daemon that would not die) fails the
test at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from harness.stack import Stack, StackConfig

DEFAULT_DOMAINS = {"work": 1, "untrusted": 2}


@pytest.fixture(scope="module")
def stack_config() -> StackConfig:
    """Default: domains work=1 and untrusted=2, broker and policyd running, no polkitd."""
    return StackConfig(domains=dict(DEFAULT_DOMAINS))


@pytest.fixture(scope="module")
def stack(stack_config: StackConfig) -> Iterator[Stack]:
    with Stack(stack_config) as running:
        yield running


@pytest.fixture
def stack_factory() -> Iterator[Callable[[StackConfig], Stack]]:
    started: list[Stack] = []

    def start(config: StackConfig) -> Stack:
        new = Stack(config)
        new.start()
        started.append(new)
        return new

    yield start
    problems = [problem for running in reversed(started) for problem in running.stop()]
    if problems:
        pytest.fail("stack teardown found problems:\n  " + "\n  ".join(problems))
