"""cascade.nn."""
