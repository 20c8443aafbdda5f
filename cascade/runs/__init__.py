"""cascade.runs."""
