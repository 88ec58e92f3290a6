"""Reading zeroquant checkpoints: the manifest (quantization.json), the model skeleton on the meta device, and
tensors checked before they replace anything (names, shapes, dtypes, integer ranges, finite positive scales)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from zeroquant.core import quant as Q
from zeroquant.core.config import QuantConfig
from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.formats.output_dir import QUANT_FILE, WEIGHTS_FILE
from zeroquant.nn.qlinear import QuantLinear


def skeleton(cls: type, hf_config, dtype: torch.dtype) -> nn.Module:
    """The architecture without weights: parameters on the meta device until a file's tensors take their
    place, so no random FP copy is ever allocated (buffers no file holds, such as rotary tables, are built
    for real: they are small)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(hf_config).to(dtype)


# 2: INT4 weights packed half-split in 64-channel chunks (the kernels' layout); 1: adjacent pairs.
FORMAT_VERSION = 2
MANIFEST_KEYS = ("preset", "config", "model_class", "dtype", "modules")


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    f = p / QUANT_FILE
    if not p.is_dir():
        raise PathError(f"{p} is not a directory")
    if not f.exists():
        raise ZeroQuantError(f"{p} is not a zeroquant checkpoint (no {QUANT_FILE})")
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZeroQuantError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "zeroquant":
        raise ZeroQuantError(f"{f}: not a zeroquant manifest (no \"format\": \"zeroquant\")")
    version = manifest.get("version", 1)
    if version != FORMAT_VERSION:  # version 1 (INT4 in adjacent pairs) was never released: nothing reads it
        raise ZeroQuantError(f"{f}: format version {version!r}; this zeroquant reads version {FORMAT_VERSION}: "
                             "quantize the model again")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ZeroQuantError(f"{f}: missing {', '.join(missing)}")
    modules = manifest["modules"]
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        raise ZeroQuantError(f"{f}: \"modules\" must map module names to their specs, got {_kind(modules)}")
    for key in ("preset", "model_class", "dtype"):
        if not isinstance(manifest[key], str):
            raise ZeroQuantError(f"{f}: \"{key}\" must be a string, got {_kind(manifest[key])}")
    if not isinstance(manifest["config"], dict):
        raise ZeroQuantError(f"{f}: \"config\" must be an object, got {_kind(manifest['config'])}")
    return manifest


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """One line naming `where` and the tensor when a tensor has another shape or dtype than the model expects,
    or holds values its quantization cannot (_check_values) (unexpected names are reported with the missing
    ones, by _assign)."""
    expected = model.state_dict()
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            continue
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ZeroQuantError(f"{where}: {name} is {t.dtype} {list(t.shape)}, the model expects "
                                 f"{want.dtype} {list(want.shape)}")
        if not t.is_meta and t.numel():
            _check_values(model, name, t, where)
    # Progressive INT4 layers, once every tensor's shape is checked: every level s2 * (q - z) of a group in int8.
    for prefix, m in model.named_modules():
        if not (isinstance(m, QuantLinear) and m.wq.progressive):
            continue
        scale, zero = tensors.get(f"{prefix}.w_scale"), tensors.get(f"{prefix}.w_zero")
        if scale is None or zero is None or scale.is_meta or not scale.numel():
            continue
        if not Q.progressive_fits(scale.float(), zero.float()):
            raise ZeroQuantError(f"{where}: {prefix} has progressive scales and zero points whose INT8 weights "
                                 "would overflow")


def _int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Stored integers a layer of `bits` accepts: the restricted range zeroquant writes, and -2^(b-1) as
    compressed-tensors writes symmetric values."""
    lo, hi = Q.qrange(bits, symmetric)
    return (lo - 1 if symmetric else lo), hi


def _check_values(model: nn.Module, name: str, t: torch.Tensor, where: str | Path) -> None:
    """Scales must be finite and positive, zero points integers in their bits' range, and unpacked integer
    weights within their bits: a file breaking these loads and runs, silently wrong."""
    prefix, _, buf = name.rpartition(".")
    if buf not in (*QuantLinear.SCALE_BUFFERS, "qweight"):
        return
    m = model.get_submodule(prefix)
    if not isinstance(m, QuantLinear):
        return
    if buf in QuantLinear.SCALE_BUFFERS and not torch.isfinite(t).all():
        raise ZeroQuantError(f"{where}: {name} holds NaN or infinite values")
    if buf in ("w_scale", "w_row_scale", "a_scale") and not (t > 0).all():
        raise ZeroQuantError(f"{where}: {name} holds zero or negative scales ({t.min().item():g})")
    if buf in ("w_zero", "a_zero"):
        spec = m.wq if buf == "w_zero" else m.aq
        lo, hi = Q.qrange(spec.bits, spec.symmetric)
        tf = t.float()
        if (tf != tf.round()).any() or tf.min() < lo or tf.max() > hi:
            raise ZeroQuantError(f"{where}: {name} holds zero points outside the integers {lo}..{hi} of "
                                 f"{spec.bits} bits (e.g. {tf[(tf < lo) | (tf > hi) | (tf != tf.round())][0]:g})")
    if buf == "qweight" and not m.packed and m.wq.bits < 8:
        lo, hi = _int_range(m.wq.bits, m.wq.symmetric)
        if t.min() < lo or t.max() > hi:
            raise ZeroQuantError(f"{where}: {name} holds integers in {t.min().item()}..{t.max().item()}, outside "
                                 f"{lo}..{hi} of the {m.wq.bits} bits its config says")


def _read_checked(model: nn.Module, file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors (read once), checked against the model (_check_tensors); nothing is loaded yet."""
    tensors = read_tensors(file, device)
    check_tensors(model, tensors, file)
    return tensors


def _retie(model: nn.Module) -> None:
    """A tied LM head and its embedding are stored once (under either name): loading by assignment filled
    only that one, so both names take it (transformers' own map of ties), then the model ties them again."""
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        names = [target, source]
        loaded = [model.get_parameter(n) for n in names if not model.get_parameter(n).is_meta]
        if loaded:
            for n in names:
                mod, _, attr = n.rpartition(".")
                setattr(model.get_submodule(mod), attr, loaded[0])
    model.tie_weights()


def read_tensors(file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors, created on `device` directly (a CUDA load never holds the model in host memory)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ZeroQuantError(f"{file}: not a readable safetensors file ({e})") from None


def read_hf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ZeroQuantError(f"cannot read {path / 'config.json'}: {e}") from None


def model_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ZeroQuantError(f"transformers has no class {name}; upgrade transformers")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ZeroQuantError(f"{name} is not a transformers model class (e.g. LlamaForCausalLM)")
    return cls


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Put the file's tensors in place of the skeleton's meta tensors; fail naming what does not match."""
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    _retie(model)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise ZeroQuantError(f"{file} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")


def _zeroquant_skeleton(path: Path) -> tuple[nn.Module, dict]:
    """The model a zeroquant checkpoint describes, every tensor on the meta device, and its manifest."""
    from zeroquant.core.config import ActQuant, WeightQuant

    manifest = read_manifest(path)
    hf_config = read_hf_config(path)
    try:
        cls = model_class(manifest["model_class"])
    except ZeroQuantError as e:
        raise ZeroQuantError(f"{path / QUANT_FILE}: model_class: {e}") from None
    dtype = getattr(torch, str(manifest["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ZeroQuantError(f"{path / QUANT_FILE}: unknown dtype {manifest['dtype']!r}")
    model = skeleton(cls, hf_config, dtype)
    for name, spec in manifest["modules"].items():
        try:
            act = None if spec["act"] is None else ActQuant(**spec["act"])
            with torch.device("meta"):
                ql = QuantLinear(spec["in"], spec["out"], spec["bias"], WeightQuant(**spec["weight"]), act, dtype)
            model.set_submodule(name, ql)
        except (KeyError, TypeError, AttributeError, ZeroQuantError) as e:
            raise ZeroQuantError(f"{path / QUANT_FILE}: module {name}: {type(e).__name__}: {e}") from None
    return model, manifest


def _manifest_config(path: Path, manifest: dict) -> QuantConfig:
    try:
        return QuantConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, AttributeError, ZeroQuantError) as e:
        raise ZeroQuantError(f"{path / QUANT_FILE}: config: {type(e).__name__}: {e}") from None


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise ZeroQuantError(f"{path} has no {WEIGHTS_FILE}")
    return file


def load_zeroquant(path: Path, device: torch.device) -> tuple[nn.Module, QuantConfig]:
    model, manifest = _zeroquant_skeleton(path)
    cfg = _manifest_config(path, manifest)
    file = _weights_file(path)
    assign_tensors(model, _read_checked(model, file, device), file)
    return model, cfg


# safetensors' dtype names
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors without reading its weights: meta tensors of the header's shapes and
    dtypes, but scales and zero points (small) read, to check their values. Fails in one line on a file that is
    empty, truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.rpartition(".")[2] in QuantLinear.SCALE_BUFFERS:
                    out[name] = f.get_tensor(name)
                    continue
                sl = f.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ZeroQuantError(f"{file}: {name} has dtype {sl.get_dtype()}, which zeroquant never writes")
                out[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError) as e:
        raise ZeroQuantError(f"{file}: not a readable safetensors file ({e})") from None
    return out


def _missing_unexpected(model: nn.Module, names: set[str]) -> tuple[list[str], list[str]]:
    """State-dict names the file lacks (a tied pair counts once) and file names the model has no place for."""
    expected = set(model.state_dict())
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    partners = {**ties, **{s: t for t, s in ties.items()}}
    missing = sorted(n for n in expected - names if partners.get(n) not in names)
    return missing, sorted(names - expected)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a zeroquant checkpoint without loading its weights: the manifest, and the weights file's header
    (every tensor present, with the shape and dtype the manifest implies) and its scales and zero points.
    Returns the manifest; raises ZeroQuantError naming what is damaged."""
    p = Path(path)
    model, manifest = _zeroquant_skeleton(p)
    _manifest_config(p, manifest)
    file = _weights_file(p)
    tensors = _header_tensors(file)
    check_tensors(model, tensors, file)
    missing, unexpected = _missing_unexpected(model, set(tensors))
    if missing or unexpected:
        raise ZeroQuantError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return manifest
