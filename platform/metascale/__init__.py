"""metascale: distributed meta-training."""
