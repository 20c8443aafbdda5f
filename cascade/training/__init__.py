"""cascade.training."""
