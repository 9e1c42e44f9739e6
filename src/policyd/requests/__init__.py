"""VM-initiated export requests: the untrusted device descriptor, the pending request and its
lifecycle (policy, approval, expiry, withdrawal). Unprivileged; no dbus-fast."""
