"""Gluon kernel families (Hopper)."""
