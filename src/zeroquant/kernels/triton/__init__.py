"""Triton kernel families (Hopper)."""
