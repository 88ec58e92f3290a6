"""The quantized modules: QuantLinear, the activation hand-off, fusion, INT4 packing."""
