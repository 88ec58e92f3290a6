"""The Hugging Face glue: loading a floating-point model and its tokenizer from a local directory or a GGUF
file (offline), and what kind of model it is. The CLI, the evaluation and the benchmark all load through
here."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

from torch import nn

from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.models.adapters import arch_for


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


# Keyword arguments through which a Hugging Face block reads or writes a KV cache: a block replayed on captured
# inputs (zeroquant.algorithms.blockwise) must run without one.
CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


def kv_cache_bytes(model: nn.Module, seq_len: float, element_size: int | None = None) -> float:
    """Bytes of one sequence's KV cache of `seq_len` tokens, `element_size` bytes a value (default: the
    model's first parameter's)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    size = element_size or next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * heads * head_dim * seq_len * size


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
        raise PathError(f"model directory not found: {path}")
    if not p.is_dir():
        raise ZeroQuantError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
    if not (p / "config.json").exists():
        raise ZeroQuantError(f"{path} is not a Hugging Face model directory (no config.json)")
    return p, {}


def check_device(device) -> str:
    """A device name checked before any work: the CPU, or a CUDA device this machine has (torch's own errors
    come late, as a pin_memory or 'not compiled with CUDA' traceback)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ZeroQuantError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZeroQuantError(f"device {device}: no CUDA GPU is available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ZeroQuantError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ZeroQuantError(f"device {device}: expected cpu, cuda or cuda:N")
    return str(device)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' and tokenizers' span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def refuse_quantized_dir(path: str | os.PathLike) -> None:
    """A quantized checkpoint given where a floating-point model is expected: transformers would load its
    config, skip the integer tensors it does not know and initialise every quantized linear at random."""
    from zeroquant.formats.compressed_format import is_compressed_dir

    p = Path(path)
    if (p / "quantization.json").exists():
        raise ZeroQuantError(f"{path} is a zeroquant quantized checkpoint (quantization.json), not a floating-point "
                             "model: give the original model (`zeroquant info` describes this one)")
    if is_compressed_dir(p):
        raise ZeroQuantError(f"{path} is a compressed-tensors quantized checkpoint, not a floating-point model: "
                             "give the original model")
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return  # the config reader says what is wrong with it
    if qc:  # GPTQ, AWQ, bitsandbytes, FP8...: already quantized
        method = qc.get("quant_method", "unknown method") if isinstance(qc, dict) else "unknown method"
        raise ZeroQuantError(f"{path} is already quantized ({method}, config.json's quantization_config), not a "
                             "floating-point model: give the original model")


def check_loading_info(path: str | os.PathLike, info: dict) -> None:
    """Refuse a model whose weights file lacks tensors (transformers initialises them at random) or holds
    tensors of another shape."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ZeroQuantError(f"the weights in {path} lack {len(missing)} tensor(s) the model needs: "
                             f"{', '.join(missing[:5])}{more} (a damaged or partial checkpoint?)")
    if mismatched:
        raise ZeroQuantError(f"the weights in {path} have other shapes than its config.json says: "
                             f"{', '.join(mismatched[:5])}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:  # a head the class has no use for (an MLM head under BertModel): say so, in one line
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        print(f"zeroquant: warning: {path} holds {len(unexpected)} tensor(s) the model does not use, ignored: "
              f"{', '.join(unexpected[:3])}{more}", file=sys.stderr)


def _load_tokenizer(d: Path, path, extra: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(d, **extra)
    except (OSError, ValueError, ImportError, KeyError, struct.error) as e:
        raise ZeroQuantError(f"cannot load the tokenizer in {path}: {one_line(e)}") from None


def read_config(d: Path, path, extra: dict):
    """The model's transformers config; one-line error when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(d, **extra)
    except (OSError, ValueError, ImportError, KeyError, struct.error) as e:  # struct: a truncated GGUF header
        raise ZeroQuantError(f"cannot read the model config of {path}: {one_line(e)}") from None


def model_class(config, gguf: bool = False) -> type:
    """The transformers class its config names (GGUF files hold decoders and name none)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    default = transformers.AutoModelForCausalLM if gguf else transformers.AutoModel
    return next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), default)


def load_fp_model(path: str | os.PathLike, device: str = "cpu", allow_generic: bool = False,
                  tokenizer: bool = True):
    """A floating-point model and its tokenizer (None when tokenizer=False), offline, from a local Hugging
    Face directory (config.json + weights) or a .gguf file (transformers dequantizes it to float; needs the
    `gguf` and `accelerate` packages). float16 on CUDA, float32 elsewhere. A quantized checkpoint, or weights
    that lack tensors the model needs, are refused rather than filled with random values."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d, extra = _source(str(path))
    if not extra:
        refuse_quantized_dir(d)
    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    config = read_config(d, path, extra)
    arch_for(config.model_type, allow_generic)  # fail on an unsupported architecture before loading weights
    # the tokenizer first: a directory without one fails before the weights are read
    tok = _load_tokenizer(d, path, extra) if tokenizer else None
    cls = model_class(config, gguf=bool(extra))
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is many lines; check_loading_info says it in one
    try:
        model, info = cls.from_pretrained(d, dtype=dtype, output_loading_info=True, **extra)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError, struct.error, SafetensorError) as e:
        raise ZeroQuantError(f"cannot load the model in {path}: {one_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(path, info)
    quantizer = getattr(model, "hf_quantizer", None)
    if extra and quantizer is not None:  # the GGUF tensors were dequantized: from here on a plain float model
        quantizer.remove_quantization_config(model)
    return model.to(device).eval(), tok
