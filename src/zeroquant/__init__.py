"""zeroquant: ZeroQuant post-training quantization for Hugging Face transformers."""

from .api import quantize, quantized_modules, set_mode
from .checkpoint import load_quantized, save_quantized
from .config import PRESETS, ActQuant, LinearRule, QuantConfig, WeightQuant
from .errors import PathError, ZeroQuantError
from .fusion import fuse
from .hf import load_fp_model
from .lkd import LKDConfig
from .lkd_data import lkd_batches
from .provenance import version
from .qlinear import QuantLinear

__all__ = [
    "PRESETS",
    "ActQuant",
    "LKDConfig",
    "LinearRule",
    "QuantConfig",
    "QuantLinear",
    "WeightQuant",
    "PathError",
    "ZeroQuantError",
    "fuse",
    "lkd_batches",
    "load_fp_model",
    "load_quantized",
    "quantize",
    "quantized_modules",
    "save_quantized",
    "set_mode",
]
__version__ = version()
