"""blockbroker's host stack for development and integration tests: real oxenstored, a private
dbus-daemon acting as the system bus, the broker, policyd and optionally polkitd.

Test harness, runs as root. `scripts/devstack` is its command line; `harness.fixtures` its
pytest plugin; docs/devstack.md describes both.
"""
