"""policyd's exports: the operations, the registry (sharing, exclusion, held fds), opening
through the broker, blkback's state and the watch on frontends. Unprivileged; no dbus-fast."""
