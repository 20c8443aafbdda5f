"""cascade.contracts."""
