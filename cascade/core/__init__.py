"""cascade.core."""
