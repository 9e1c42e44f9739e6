"""blockbroker broker package."""
