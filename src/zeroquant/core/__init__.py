"""Arithmetic and configuration: number formats, presets, errors (no torch.nn)."""
