"""Client tests run against the shared host stack (real bus, oxenstored, broker, policyd)."""

from harness.fixtures import stack, stack_config, stack_factory  # noqa: F401
