"""blockbroker client package."""
