"""zeroquant: ZeroQuant post-training quantization for Hugging Face transformers."""

from zeroquant.algorithms.lkd import LKDConfig
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.api import quantize, quantized_modules, set_mode
from zeroquant.core.config import PRESETS, ActQuant, LinearRule, QuantConfig, WeightQuant
from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.core.state import QuantState
from zeroquant.formats.checkpoint import load_quantized, save_quantized
from zeroquant.formats.provenance import version
from zeroquant.models.fusion import fuse
from zeroquant.models.hf import load_fp_model
from zeroquant.models.hf_attention import use_kernel_attention
from zeroquant.nn.qlinear import QuantLinear
from zeroquant.nn.quantized_weight import QuantizedWeight

__all__ = [
    "PRESETS",
    "ActQuant",
    "LKDConfig",
    "LinearRule",
    "QuantConfig",
    "QuantLinear",
    "QuantState",
    "QuantizedWeight",
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
    "use_kernel_attention",
]
__version__ = version()
