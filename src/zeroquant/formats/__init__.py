"""Checkpoints on disk: zeroquant's own, compressed-tensors, provenance."""
