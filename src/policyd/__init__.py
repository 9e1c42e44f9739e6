"""blockbroker policyd package."""
