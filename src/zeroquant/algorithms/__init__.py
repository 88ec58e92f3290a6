"""The quantization algorithms and the block runner they share."""
