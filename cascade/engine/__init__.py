"""cascade.engine."""
