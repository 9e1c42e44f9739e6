"""The host stack's own tests use the fixtures they provide to everyone else."""

from harness.fixtures import stack, stack_config, stack_factory  # noqa: F401
