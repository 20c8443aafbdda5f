"""cascade.deploy."""
