"""The Hugging Face glue: loading a floating-point model and its tokenizer from a local directory or a GGUF
file (offline), and what kind of model it is. The CLI, the evaluation and the benchmark all load through
here."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from torch import nn

from .adapters import arch_for
from .errors import ZeroQuantError


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def has_mlm_head(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def model_tokenizer(model: nn.Module):
    """The tokenizer saved beside the model's weights, when the model was loaded from a local dir."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if path and os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            return None
    return None


def _source(path: str) -> tuple[Path, dict]:
    """(directory, extra from_pretrained kwargs) of a model directory or a .gguf file; fails on anything else."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p.parent, {"gguf_file": p.name}
    if not p.exists():
        raise ZeroQuantError(f"model directory not found: {path}")
    if not p.is_dir():
        raise ZeroQuantError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
    if not (p / "config.json").exists():
        raise ZeroQuantError(f"{path} is not a Hugging Face model directory (no config.json)")
    return p, {}


def load_fp_model(path: str | os.PathLike, device: str = "cpu", allow_generic: bool = False,
                  tokenizer: bool = True):
    """A floating-point model and its tokenizer (None when tokenizer=False), offline, from a local Hugging
    Face directory (config.json + weights) or a .gguf file (transformers dequantizes it to float; needs the
    `gguf` and `accelerate` packages). float16 on CUDA, float32 elsewhere."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d, extra = _source(str(path))
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(d, **extra)
    except (OSError, ValueError, ImportError, KeyError, struct.error) as e:  # struct: a truncated GGUF header
        raise ZeroQuantError(f"cannot read the model config of {path}: {e}") from None
    arch_for(config.model_type, allow_generic)  # fail on an unsupported architecture before loading weights
    archs = getattr(config, "architectures", None) or []
    # GGUF files hold decoders and name no architecture class
    default = AutoModelForCausalLM if extra else transformers.AutoModel
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), default)
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        model = cls.from_pretrained(d, dtype=dtype, **extra)
        tok = AutoTokenizer.from_pretrained(d, **extra) if tokenizer else None
    except (OSError, ValueError, ImportError, KeyError, struct.error) as e:
        raise ZeroQuantError(f"cannot load the model in {path}: {e}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if extra and quantizer is not None:  # the GGUF tensors were dequantized: from here on a plain float model
        quantizer.remove_quantization_config(model)
    return model.to(device).eval(), tok
