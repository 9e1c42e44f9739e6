"""policyd's XenStore: the connection (wire format, deadlines), transactions and batches, and
the vbd contract (what is read and written where). Unprivileged; XenStore content is validated."""
