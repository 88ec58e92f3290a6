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
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from zeroquant.api import quantized_modules
from zeroquant.core.config import QuantConfig
from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.core.state import QuantState, state_of
from zeroquant.formats.checkpoint_read import (
    FORMAT_VERSION,
    assign_tensors,
    check_tensors,
    load_zeroquant,
    model_class,
    read_hf_config,
    read_tensors,
    skeleton,
)
from zeroquant.formats.output_dir import QUANT_FILE, WEIGHTS_FILE, check_output_dir, write_atomically
from zeroquant.formats.provenance import version
from zeroquant.models.fusion import fuse as fuse_ops
from zeroquant.models.hf import check_device, model_tokenizer
from zeroquant.models.hf_attention import use_kernel_attention
from zeroquant.nn.qlinear import QuantLinear


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def quant_manifest(model: nn.Module) -> dict:
    state = state_of(model)
    if state is None:
        raise ZeroQuantError("model is not quantized: call zeroquant.quantize first")
    cfg = state.config
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


FORMATS = ("zeroquant", "compressed-tensors")


def _sort_metadata(file: Path) -> None:
    """safetensors writes __metadata__ (ours, and the names of tied tensors save_model dropped) from a Rust
    HashMap, in an order that changes from run to run: sort it in place (the same bytes in another order) so
    identical runs write identical files a user can check by hash."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")

        def dump(h: dict) -> bytes:  # serde_json's compact form, padded with spaces as safetensors pads
            return json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode().ljust(n)

        if not meta or dump(header) != raw:  # another writer's formatting: leave the file as written
            return
        f.seek(8)
        f.write(dump({**header, "__metadata__": dict(sorted(meta.items()))}))


def _write_hf_files(model: nn.Module, tmp: Path, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer, as the source model had them."""
    model.config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    tok = tokenizer if tokenizer is not None else model_tokenizer(model)
    if tok is not None:
        tok.save_pretrained(tmp)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                   format: str = "zeroquant", overwrite: bool = False, provenance: dict | None = None) -> Path:
    """Write the quantized model to `out_dir` atomically (temp dir + rename): a failure leaves nothing.

    format: "zeroquant" (quantization.json + model.safetensors, read by zq.load_quantized) or
        "compressed-tensors" (what llm-compressor writes and vLLM, SGLang and transformers load; the same
        integers; refused, with nothing written, for schemes that format cannot spell).
    An existing `out_dir` is written into only if it is empty, a previous checkpoint of either format, or
    `overwrite` is set; files a save did not write are kept either way. The current directory and paths
    under a file are refused (check_output_dir).
    `extra` files (name -> JSON-able object) are written beside the model, e.g. a distillation report.
    `provenance` (zeroquant.formats.provenance: how the model was made) goes into quantization.json with the version.
    """
    if format not in FORMATS:
        raise ZeroQuantError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_dir(out_dir, overwrite=overwrite)
    manifest = quant_manifest(model)
    manifest["provenance"] = {"zeroquant": version(), **(provenance or {})}
    meta = next((n for n, t in model.state_dict().items() if t.is_meta), None)
    if meta is not None:  # a model built under init_empty_weights: nothing to write
        raise ZeroQuantError(f"{meta} is on the meta device (it holds no data): load real weights before saving")
    if format == "compressed-tensors":
        fill = _compressed_writer(model)
    else:
        def fill(tmp: Path) -> None:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "zeroquant": str(FORMAT_VERSION)})
            _sort_metadata(tmp / WEIGHTS_FILE)
            (tmp / QUANT_FILE).write_text(json.dumps(manifest, indent=2))

    def write(tmp: Path) -> None:
        _write_hf_files(model, tmp, tokenizer)
        fill(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))

    try:
        return write_atomically(out, write)
    except OSError as e:  # disk full, quota, permissions: the temp directory is gone, `out` is as it was
        raise PathError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None


def _compressed_writer(model: nn.Module):
    """fill(tmp) for a compressed-tensors export; every check runs now, before a directory exists."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from zeroquant.formats.compressed_format import export_compressed

    qconfig, tensors = export_compressed(model, skeleton(type(model), model.config, torch.float32))

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["architectures"] = [type(model).__name__]
        cfg["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))

    return fill


def _load_compressed(path: Path, device: torch.device) -> tuple[nn.Module, QuantConfig]:
    """A compressed-tensors checkpoint (llm-compressor's, or our export) on QuantLinear: the same integers."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from pydantic import ValidationError

    from zeroquant.api import linear_kinds
    from zeroquant.formats import compressed_format as CT

    cfg_file = path / "config.json"
    try:
        qc = QuantizationConfig.model_validate(CT.read_config(path))
    except ValidationError as e:
        raise ZeroQuantError(f"{cfg_file}: not a valid compressed-tensors config "
                             f"({e.errors()[0]['loc']}: {e.errors()[0]['msg']})") from None
    hf_config = read_hf_config(path)
    cls = model_class((getattr(hf_config, "architectures", None) or ["AutoModel"])[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ZeroQuantError(f"{path} has no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_tensors(f, device))
    where = str(files[0] if len(files) == 1 else path)
    # the float weights' own dtype (config.json's may predate a .half()); scales are float32 whatever it is
    floats = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(CT.SCALE_NAMES)}
    dtype = floats.pop() if len(floats) == 1 else getattr(hf_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = skeleton(cls, hf_config, dtype)
    matched: dict[str, tuple] = {}
    for group, scheme in qc.config_groups.items():
        rule, fmt = CT.scheme_rule(scheme, f"{cfg_file}: {group}")
        for name, module in match_named_modules(model, scheme.targets, qc.ignore or []):
            if not isinstance(module, nn.Linear) or name in matched:
                raise ZeroQuantError(f"{cfg_file}: {group} targets {name}, "
                                     + ("which is no nn.Linear" if name not in matched else "matched twice"))
            matched[name] = (module, rule, fmt)
    assigned: dict[str, torch.Tensor] = {}
    for name, (module, rule, fmt) in matched.items():
        with torch.device("meta"):
            ql = QuantLinear(module.in_features, module.out_features, module.bias is not None, rule.weight,
                             rule.act, dtype)
        model.set_submodule(name, ql)
        assigned.update(CT.import_buffers(name, ql, fmt, tensors, where))
    owned = tuple(f"{n}." for n in matched)
    for name, t in tensors.items():
        if not name.startswith(owned):
            assigned[name] = t.to(dtype) if t.is_floating_point() else t
    check_tensors(model, assigned, where)
    assign_tensors(model, assigned, Path(where))
    rules = {n: r for n, (_, r, _) in matched.items()}
    return model, CT.imported_config(rules, linear_kinds(model, allow_generic=True))


def checkpoint_format(path: str | os.PathLike) -> str:
    """"compressed-tensors" for a directory in that format without our quantization.json, else "zeroquant"
    (whose reader says what is wrong with anything else)."""
    from zeroquant.formats.compressed_format import is_compressed_dir

    p = Path(path)
    return "compressed-tensors" if not (p / QUANT_FILE).exists() and is_compressed_dir(p) else "zeroquant"


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", fuse: bool = True) -> nn.Module:
    """Rebuild a model saved by save_quantized (either format), or load a compressed-tensors checkpoint that
    another tool (llm-compressor) wrote, where its scheme is one zeroquant runs: INT8 or INT4 weights per
    channel or group, symmetric or with zero points, and dynamic token-wise or static INT8 activations. Its
    forward matches the model that was saved.

    fuse: apply zeroquant.models.fusion (norm -> quant, activation -> epilogue), as quantize() does.
    """
    p, dev = Path(path), torch.device(check_device(device))
    if checkpoint_format(p) == "compressed-tensors":
        model, cfg = _load_compressed(p, dev)
    else:
        model, cfg = load_zeroquant(p, dev)
    model.to(dev)  # what no file holds (rotary tables) was built on the host
    for m in quantized_modules(model).values():
        m.scales_group_major()
    if fuse:
        fuse_ops(model)
        use_kernel_attention(model)
    model.zeroquant = QuantState(cfg)
    model.config._name_or_path = str(path)
    return model.eval()
