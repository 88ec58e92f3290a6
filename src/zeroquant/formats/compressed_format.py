"""The compressed-tensors format (written by llm-compressor; read by vLLM, SGLang and transformers): export a
zeroquant model to it, and import a checkpoint in it onto zeroquant's QuantLinear and kernels.

The integers are carried over unchanged. compressed-tensors keeps signed integers (INT4 in -8..7, with a
signed zero point when asymmetric); zeroquant keeps asymmetric values unsigned (0..15), so the two differ by
a constant offset of 2^(bits-1) in both the integers and the zero points, and (q - z) * scale is the same.
The `compressed_tensors` package does the format's own work: its pydantic models spell and validate the
config, its packers write and read `weight_packed`, its matcher says which module a config group targets.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from zeroquant.core import quant as Q
from zeroquant.core.config import ActQuant, LinearRule, QuantConfig, WeightQuant
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.adapters import is_linear
from zeroquant.nn.qlinear import QuantLinear

METHOD = "compressed-tensors"
SCALE_NAMES = ("weight_scale", "input_scale", "weight_global_scale", "input_global_scale")


def _offset(bits: int, symmetric: bool) -> int:
    """What zeroquant's stored integers exceed compressed-tensors' by (asymmetric values are unsigned here)."""
    return 0 if symmetric else 1 << (bits - 1)


# ------------------------------------------------------------------------------------------ export


def weight_args(m: QuantLinear) -> dict:
    """compressed-tensors QuantizationArgs fields of a QuantLinear's weight (one that _check_groups passed)."""
    w = m.wq
    args = {"num_bits": w.bits, "type": "int", "symmetric": w.symmetric, "dynamic": False}
    if w.per_tensor:
        return {**args, "strategy": "tensor"}
    if m.group_size == m.in_features:
        return {**args, "strategy": "channel"}
    return {**args, "strategy": "group", "group_size": m.group_size}


def act_args(m: QuantLinear) -> dict | None:
    a = m.aq
    if a is None:
        return None
    if a.dynamic:
        return {"num_bits": a.bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "strategy": "tensor", "dynamic": False}


def _scheme_format(weights: dict, acts: dict | None) -> str:
    """The storage format compressed-tensors itself picks for a scheme (llm-compressor's choice)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return infer_module_format(nn.Linear, scheme).value


def export_tensors(prefix: str, m: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """One QuantLinear's tensors under the names and dtypes compressed-tensors gives them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    w = m.wq
    off = _offset(w.bits, w.symmetric)
    q = (m.quantized.ints().to(torch.int16) - off).to(torch.int8)
    # float32 even where the layer stores float16: compressed-tensors' decompressor computes (q - z) * scale in
    # the scale's dtype, and float16 products would no longer be the weights zeroquant computes with.
    scale = m.quantized.group_scale().float().contiguous()  # progressive: s1 * s2, exact in float32
    out: dict[str, torch.Tensor] = {}
    if w.per_tensor:
        scale = scale[:1, 0].clone()
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_to_int32(q, w.bits)
        out["weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
    else:
        out["weight"] = q.contiguous()
    out["weight_scale"] = scale
    if m.w_zero is not None:
        z = (m.w_zero.to(torch.int16) - off).to(torch.int8)
        z = z[:1, 0].clone() if w.per_tensor else z.contiguous()
        out["weight_zero_point"] = pack_to_int32(z, w.bits, packed_dim=0) if (
            fmt == "pack-quantized" and not w.per_tensor) else z
    if m.bias is not None:
        out["bias"] = m.bias.detach().contiguous()
    if m.a_scale is not None:
        out["input_scale"] = m.a_scale.float().reshape(1).clone()
        if not m.aq.symmetric:
            out["input_zero_point"] = (m.a_zero.reshape(1) - _offset(m.aq.bits, False)).to(torch.int8)
    return {f"{prefix}.{k}": v for k, v in out.items()}


def _pattern(name: str) -> str:
    """A target regex for `name` and its namesakes in every block: the digits of layer indices wildcarded."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
    return "re:^" + r"\.".join(parts) + "$"


def _targets(groups: dict[str, list[str]], linears: list[str]) -> dict[str, list[str]]:
    """Targets per group: one regex per module position (the same linear of every block) where that regex matches
    exactly the group's modules among the model's linears, else the module names themselves."""
    out = {}
    for key, names in groups.items():
        members, targets = set(names), []
        for pat in dict.fromkeys(_pattern(n) for n in names):
            hits = {n for n in linears if re.match(pat[3:], n)}
            targets += [pat] if hits <= members else sorted(hits & members)
        out[key] = targets
    return out


def export_compressed(model: nn.Module, skeleton: nn.Module):
    """(compressed-tensors QuantizationConfig, every tensor of the checkpoint) for a quantized model.

    skeleton: the model's architecture with its original modules (on the meta device), to tell nn.Linear from
    GPT-2's Conv1D and to list the linears that stay floating point."""
    from compressed_tensors.quantization import QuantizationConfig

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = [n for n, m in skeleton.named_modules() if is_linear(m)]
    conv = [n for n in quantized if not isinstance(skeleton.get_submodule(n), nn.Linear)]
    if conv:
        raise ZeroQuantError(_conv1d_error(conv[0]))
    sizes = [m.in_features for m in quantized.values()]
    for name, m in quantized.items():
        _check_groups(name, m.wq, m.in_features, sizes)
    groups: dict[str, list[str]] = {}
    schemes: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in quantized.items():
        weights = weight_args(m)
        acts = act_args(m)
        key = json.dumps([weights, acts], sort_keys=True)
        if key not in schemes:
            schemes[key] = {"weights": weights, "input_activations": acts, "format": _scheme_format(weights, acts)}
        groups.setdefault(key, []).append(name)
        tensors.update(export_tensors(name, m, schemes[key]["format"]))
    targets = _targets(groups, linears)
    config_groups = {f"group_{i}": {**schemes[k], "targets": targets[k]} for i, k in enumerate(groups)}
    formats = {s["format"] for s in schemes.values()}
    qc = QuantizationConfig(
        config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed", ignore=[n for n in linears if n not in quantized])
    owned = tuple(f"{n}." for n in quantized)
    seen: set[tuple[int, tuple]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape))
        if name.startswith(owned) or key in seen:
            continue  # a tied copy (lm_head of a tied embedding): the loader ties it again
        seen.add(key)
        tensors[name] = t.detach().contiguous()
    return qc, tensors


def _divisor_hint(sizes: list[int]) -> str:
    g = math.gcd(*sizes)
    best = min(g & -g, 128)  # the largest power of two dividing every input size
    return ("quantize with a group size that divides every layer's input size: the preset with "
            + (f"-g{best} or " if best >= 32 else "") + "-ch (one scale per output channel)")


def check_exportable(model: nn.Module, config: QuantConfig, allow_generic: bool = False) -> None:
    """Fail before any quantization work where the export would refuse the result."""
    from zeroquant.algorithms.targets import find_targets

    targets = find_targets(model, config, allow_generic)
    sizes = [t.module.weight.shape[-1] for t in targets if isinstance(t.module, nn.Linear)]
    for t in targets:
        if not isinstance(t.module, nn.Linear):
            raise ZeroQuantError(_conv1d_error(t.name))
        _check_groups(t.name, t.rule.weight, t.module.in_features, sizes)


def _check_groups(name: str, w: WeightQuant, k: int, sizes: list[int]) -> None:
    """Raise where `w`'s groups leave a short last group in a row of k channels (`sizes`: every quantized
    layer's input size, for the hint)."""
    g = Q.group_len(k, w.group_size)
    if not w.per_tensor and k % g:
        raise ZeroQuantError(f"{name}: groups of {g} do not divide {k} input channels, and compressed-tensors has "
                             f"no short last group; {_divisor_hint(sizes)}")


def _conv1d_error(name: str) -> str:
    return f"{name} is a GPT-2-style Conv1D layer: compressed-tensors and vLLM quantize nn.Linear layers only"


# ------------------------------------------------------------------------------------------ import


def is_compressed_dir(path: str | os.PathLike) -> bool:
    f = Path(path) / "config.json"
    try:
        qc = json.loads(f.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == METHOD


def read_config(path: Path) -> dict:
    """config.json's quantization_config, after refusing what zeroquant does not run (one line, naming it)."""
    f = path / "config.json"
    try:
        qc = json.loads(f.read_text())["quantization_config"]
    except (OSError, ValueError, KeyError) as e:
        raise ZeroQuantError(f"{f}: no readable quantization_config ({e})") from None
    for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms"),
                      ("kv_cache_scheme", "KV-cache quantization")):
        if qc.get(key):
            raise ZeroQuantError(f"{f}: zeroquant does not run compressed-tensors {what} ({key})")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ZeroQuantError(f"{f}: quantization_status {qc['quantization_status']!r}: only compressed "
                             "checkpoints hold integer weights")
    return qc


def _name(v) -> str:
    """An enum field's string (compressed-tensors' models keep some as enums, some as their values)."""
    return str(getattr(v, "value", v))


def scheme_rule(scheme, where: str) -> tuple[LinearRule, str]:
    """A compressed-tensors QuantizationScheme as a zeroquant LinearRule, and its storage format."""
    w, a = scheme.weights, scheme.input_activations

    def refuse(what: str):
        return ZeroQuantError(f"{where}: {what} has no zeroquant kernel")

    if w is None or _name(w.type) != "int":
        raise refuse("weights of type " + (_name(w.type) if w is not None else "none"))
    strategy = _name(w.strategy)
    if strategy not in ("tensor", "channel", "group") or not 2 <= w.num_bits <= 8:
        raise refuse(f"a {w.num_bits}-bit {strategy} weight")
    if scheme.output_activations is not None:
        raise refuse("output quantization")
    weight = WeightQuant(w.num_bits, w.group_size if strategy == "group" else -1, w.symmetric,
                         per_tensor=strategy == "tensor")
    act = None
    if a is not None:
        token = _name(a.strategy) == "token" and a.dynamic is True and a.symmetric
        static = _name(a.strategy) == "tensor" and a.dynamic is False
        if _name(a.type) != "int" or not (token or static):
            raise refuse(f"{_name(a.type)} {_name(a.strategy)} activations (dynamic={a.dynamic}, "
                         f"symmetric={a.symmetric})")
        act = ActQuant(a.num_bits, dynamic=token, symmetric=a.symmetric)
    fmt = _name(scheme.format or "")
    return LinearRule(weight, act), fmt


def import_buffers(prefix: str, ql: QuantLinear, fmt: str, file: dict[str, torch.Tensor], where: str
                   ) -> dict[str, torch.Tensor]:
    """A compressed-tensors module's tensors as the QuantLinear buffers of `ql` (names relative to the model)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    def get(name: str) -> torch.Tensor:
        t = file.get(f"{prefix}.{name}")
        if t is None:
            raise ZeroQuantError(f"{where}: {prefix}.{name} is missing")
        return t

    w = ql.wq
    n, k = ql.out_features, ql.in_features
    off = _offset(w.bits, w.symmetric)
    groups = 1 if w.per_tensor else Q.num_groups(k, w.group_size)
    if f"{prefix}.weight_g_idx" in file:
        raise ZeroQuantError(f"{where}: {prefix}.weight_g_idx: activation-ordered groups have no zeroquant kernel")
    def unpack(name: str, shape: list[int], dim: int) -> torch.Tensor:
        t = get(name)
        words = -(-shape[dim] * w.bits // 32)  # a config whose num_bits lies unpacks garbage of the right shape
        if t.dim() != 2 or t.shape[dim] != words:
            raise ZeroQuantError(f"{where}: {prefix}.{name} is {list(t.shape)}: {shape[dim]} values of {w.bits} bits "
                                 f"pack into {words} int32 words (does the config's num_bits match the tensors?)")
        try:
            return unpack_from_int32(t, w.bits, torch.Size(shape), packed_dim=dim)
        except (RuntimeError, ValueError) as e:
            raise ZeroQuantError(f"{where}: {prefix}.{name} does not unpack to {shape}: {e}") from None

    packed = f"{prefix}.weight_packed" in file
    q = unpack("weight_packed", [n, k], 1) if packed else get("weight")
    if q.shape != (n, k) or q.dtype != torch.int8:
        raise ZeroQuantError(f"{where}: {prefix} weight is {q.dtype} {list(q.shape)}, expected int8 [{n}, {k}]")
    lo, hi = -(1 << (w.bits - 1)), (1 << (w.bits - 1)) - 1  # compressed-tensors' signed range, either symmetry
    if q.numel() and (q.min() < lo or q.max() > hi):  # packing would wrap them: a silently different model
        raise ZeroQuantError(f"{where}: {prefix} weight holds integers in {q.min().item()}..{q.max().item()}, "
                             f"outside {lo}..{hi} of the {w.bits} bits its config says")
    scale = get("weight_scale").float()
    scale = scale.reshape(1, 1).expand(n, 1) if w.per_tensor else scale
    if scale.shape != (n, groups):
        raise ZeroQuantError(f"{where}: {prefix}.weight_scale is {list(scale.shape)}, expected [{n}, {groups}]")
    if not torch.isfinite(scale).all():
        raise ZeroQuantError(f"{where}: {prefix}.weight_scale holds NaN or infinite values")
    q = q.to(torch.int16) + off
    out = {"qweight": Q.pack_int4(q, w.symmetric) if ql.packed else q.to(Q.storage_dtype(w.bits, w.symmetric)),
           "w_scale": scale.contiguous()}
    if not w.symmetric:
        z = get("weight_zero_point")
        if z.dtype == torch.int32 and not w.per_tensor:
            z = unpack("weight_zero_point", [n, groups], 0)
        z = z.reshape(1, 1).expand(n, 1) if w.per_tensor else z
        if z.shape != (n, groups):
            raise ZeroQuantError(f"{where}: {prefix}.weight_zero_point is {list(z.shape)}, expected [{n}, {groups}]")
        out["w_zero"] = (z.float() + off).contiguous()
    if ql.bias is not None:
        out["bias"] = get("bias")
    if ql.a_scale is not None:
        out["a_scale"] = get("input_scale").float().reshape(())
        zp = file.get(f"{prefix}.input_zero_point")
        out["a_zero"] = (torch.zeros(()) if zp is None else zp.float().reshape(())) + _offset(ql.aq.bits,
                                                                                              ql.aq.symmetric)
    return {f"{prefix}.{k}": v for k, v in out.items()}


def imported_config(rules: dict[str, LinearRule], kinds: dict[str, str]) -> QuantConfig:
    """A QuantConfig describing an imported model: per module kind, the rule of its first quantized linear."""
    per_kind: dict[str, LinearRule] = {}
    for name, rule in rules.items():
        kind = kinds.get(name)
        if kind is not None:
            per_kind.setdefault(kind, rule)
    return QuantConfig(attention=per_kind.get("attention", LinearRule()), mlp=per_kind.get("mlp", LinearRule()),
                       name=METHOD)
