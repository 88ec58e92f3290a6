"""Save and load quantized models: safetensors (no pickle) + quantization.json beside config.json.

Layout of a saved directory:
    config.json, generation_config.json   the Hugging Face model config, untouched
    tokenizer files                        when a tokenizer was given or found beside the source model
    quantization.json                      our config, the model class, every quantized module
    model.safetensors                      float params + QuantLinear buffers (INT4 packed two per byte)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from . import quant as Q
from .api import quantized_modules
from .calib import model_tokenizer
from .config import QuantConfig
from .errors import ZeroQuantError
from .fusion import fuse as fuse_ops
from .qlinear import QuantLinear

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
# 2: INT4 weights packed half-split in 64-channel chunks (the kernels' layout); 1: adjacent pairs.
FORMAT_VERSION = 2


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def quant_manifest(model: nn.Module) -> dict:
    cfg: QuantConfig | None = getattr(model, "zeroquant_config", None)
    if cfg is None:
        raise ZeroQuantError("model is not quantized: call zeroquant.quantize first")
    modules = {
        name: {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
               "weight": vars(m.wq), "act": None if m.aq is None else vars(m.aq)}
        for name, m in quantized_modules(model).items()
    }
    return {
        "format": "zeroquant",
        "version": FORMAT_VERSION,
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "model_class": type(model).__name__,
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "modules": modules,
    }


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the quantized model to `out_dir` atomically (temp dir + rename): a failure leaves nothing.

    An existing `out_dir` is replaced only if it is empty or a previous zeroquant checkpoint.
    `extra` files (name -> JSON-able object) are written beside the model, e.g. a distillation report.
    """
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / QUANT_FILE).exists())):
        raise ZeroQuantError(f"{out} exists and is not a zeroquant checkpoint; refusing to overwrite it")
    manifest = quant_manifest(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        tok = tokenizer if tokenizer is not None else model_tokenizer(model)
        if tok is not None:
            tok.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "zeroquant": str(FORMAT_VERSION)})
        (tmp / QUANT_FILE).write_text(json.dumps(manifest, indent=2))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    f = p / QUANT_FILE
    if not p.is_dir():
        raise ZeroQuantError(f"{p} is not a directory")
    if not f.exists():
        raise ZeroQuantError(f"{p} is not a zeroquant checkpoint (no {QUANT_FILE})")
    manifest = json.loads(f.read_text())
    if manifest.get("format") != "zeroquant" or manifest.get("version", 0) > FORMAT_VERSION:
        raise ZeroQuantError(f"{f}: unsupported checkpoint format/version")
    return manifest


@torch.no_grad()
def _repack_v1_int4(model: nn.Module) -> None:
    """Version-1 checkpoints packed INT4 as adjacent pairs; rewrite them in the current layout."""
    for m in quantized_modules(model).values():
        if m.packed:
            m.qweight.copy_(Q.pack_int4(Q.unpack_int4_pairs(m.qweight), symmetric=False))


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", fuse: bool = True) -> nn.Module:
    """Rebuild a model saved by save_quantized; its forward matches the model that was saved.

    fuse: apply zeroquant.fusion (norm -> quant, activation -> epilogue), as quantize() does.
    """
    import transformers
    from transformers import AutoConfig

    from .config import ActQuant, WeightQuant

    manifest = read_manifest(path)
    hf_config = AutoConfig.from_pretrained(path)
    cls = getattr(transformers, manifest["model_class"], None)
    if cls is None:
        raise ZeroQuantError(f"transformers has no class {manifest['model_class']}; upgrade transformers")
    dtype = getattr(torch, manifest["dtype"])
    model = cls(hf_config).to(dtype)
    for name, spec in manifest["modules"].items():
        act = None if spec["act"] is None else ActQuant(**spec["act"])
        ql = QuantLinear(spec["in"], spec["out"], spec["bias"], WeightQuant(**spec["weight"]), act, dtype)
        model.set_submodule(name, ql)
    missing, unexpected = load_model(model, str(Path(path) / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ZeroQuantError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if manifest.get("version", 1) < 2:
        _repack_v1_int4(model)
    if fuse:
        fuse_ops(model)
    model.zeroquant_config = QuantConfig.from_dict(manifest["config"])
    model.zeroquant_generic = False
    model.config._name_or_path = str(path)
    return model.to(device).eval()
