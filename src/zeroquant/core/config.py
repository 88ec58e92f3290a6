"""Quantization configuration: per-module-kind rules and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from zeroquant.core.errors import ZeroQuantError

# "int8": progressive INT4 (zeroquant.core.quant.progressive_scale_zero), integer group scales times a float one
# per row, so that a W4A8 GEMM runs its K loop in integers alone.
SCALE_DTYPES = ("float32", "float16", "int8")
# The preset-name suffix of each scale dtype (resolve_config: "w4a16+fp32scale").
SCALE_SUFFIXES = {"float32": "fp32scale", "float16": "fp16scale", "int8": "int8scale"}


@dataclass(frozen=True)
class WeightQuant:
    bits: int = 8
    group_size: int = 128  # input channels per scale; -1 = one scale per output row
    symmetric: bool = True
    per_tensor: bool = False  # naive baseline: one scale for the whole matrix
    # How scales and zero points are stored (layers, checkpoints, kernels): "float16" halves their bytes
    # (zero points are small integers, exact either way; scales round to 11 significant bits); "int8" stores
    # integer group scales and one float scale per row (progressive INT4: 4-bit asymmetric group-wise only).
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ZeroQuantError(f"weight bits must be in 2..8, got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ZeroQuantError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.progressive and (self.bits != 4 or self.symmetric or self.per_tensor):
            raise ZeroQuantError("int8 (progressive) scales are for 4-bit asymmetric group-wise weights, got "
                                 f"{self.bits}-bit {'symmetric' if self.symmetric else 'asymmetric'}"
                                 f"{' per-tensor' if self.per_tensor else ''}")
        if self.group_size == 0 or self.group_size < -1:
            raise ZeroQuantError(f"group_size must be positive or -1 (per row), got {self.group_size}")

    @property
    def progressive(self) -> bool:
        """Integer group scales times a float row scale (zeroquant.core.quant.progressive_scale_zero)."""
        return self.scale_dtype == "int8"

    @property
    def float_scale_dtype(self):
        """The dtype the effective (float) group scales are rounded to: the stored one, or float32, where
        progressive scales s1 * s2 are exact."""
        import torch

        return torch.float32 if self.progressive else getattr(torch, self.scale_dtype)


@dataclass(frozen=True)
class ActQuant:
    bits: int = 8
    dynamic: bool = True  # True: one scale per token at run time; False: static per-tensor from calibration
    symmetric: bool = True  # static only; token-wise dynamic quantization is always symmetric

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ZeroQuantError(f"activation bits must be in 2..8, got {self.bits}")


ROUNDINGS = ("rtn", "gptq")


@dataclass(frozen=True)
class LinearRule:
    """How one kind of linear is quantized; None keeps that side in floating point.

    rounding: "rtn" rounds each weight to its nearest level; "gptq" rounds column by column and spreads each
    column's error over the columns not yet rounded, weighted by the calibration inputs' Hessian
    (zeroquant.algorithms.gptq; needs calibration data)."""

    weight: WeightQuant | None = None
    act: ActQuant | None = None
    rounding: str = "rtn"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ZeroQuantError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")


KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class QuantConfig:
    """Per module kind, how its linears are quantized.

    smooth: fold SmoothQuant scales into the model before quantizing (zeroquant.algorithms.smooth) where the consumers
    quantize their activations: "auto" searches alpha per site on calibration data, a float in [0, 1] fixes
    it, None (default) does not smooth. Needs calibration data."""

    attention: LinearRule = field(default_factory=LinearRule)
    mlp: LinearRule = field(default_factory=LinearRule)
    name: str = "custom"
    smooth: float | str | None = None

    def __post_init__(self) -> None:
        ok = self.smooth in (None, "auto") or (isinstance(self.smooth, (int, float)) and 0 <= self.smooth <= 1)
        if not ok:
            raise ZeroQuantError(f"smooth must be None, 'auto' or an alpha in [0, 1], got {self.smooth!r}")

    def rule(self, kind: str) -> LinearRule:
        if kind not in KINDS:
            raise ZeroQuantError(f"unknown module kind {kind!r}; expected one of {KINDS}")
        return getattr(self, kind)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales are calibrated: the config cannot quantize without data."""
        return any(r.act is not None and not r.act.dynamic for r in (self.attention, self.mlp))

    @property
    def needs_data(self) -> bool:
        """Whether quantizing with this config reads calibration data (static scales, GPTQ, smoothing)."""
        return self.needs_calibration or self.uses_gptq or self.uses_smoothing

    @property
    def uses_smoothing(self) -> bool:
        """Smoothing reads calibration activations, and only applies where activations are quantized."""
        return self.smooth is not None and any(r.act is not None for r in (self.attention, self.mlp))

    @property
    def uses_gptq(self) -> bool:
        """GPTQ rounding reads calibration inputs: the config cannot quantize without data."""
        return any(r.weight is not None and r.rounding == "gptq" for r in (self.attention, self.mlp))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        def rule(r: dict) -> LinearRule:
            return LinearRule(
                weight=WeightQuant(**r["weight"]) if r.get("weight") else None,
                act=ActQuant(**r["act"]) if r.get("act") else None,
                rounding=r.get("rounding", "rtn"),
            )

        return cls(attention=rule(d["attention"]), mlp=rule(d["mlp"]), name=d.get("name", "custom"),
                   smooth=d.get("smooth"))


# INT8 weights: one scale per output channel. With 256 levels, groups buy almost no accuracy (MiniLM w8a8,
# docs/results.md), while a per-channel scale factors out of the integer dot product: the INT8 GEMM accumulates
# all of K in int32 and scales once, where a group-wise one converts and scales every 128-channel group, which
# makes prefill slower (docs/history.md, "Why the gaps"). ZeroQuant's own kernels scale per output row too.
# Group-wise INT8 stays one suffix away: "w8a8-g128".
W8 = WeightQuant(bits=8, group_size=-1, symmetric=True)
# INT4 keeps a zero point: with only 16 levels, an asymmetric grid wastes none on a skewed group. Its group
# scales and zero points are stored in float16: 0.25 bits a weight instead of 0.5, at no measured accuracy
# cost (docs/results.md, "INT4 scales in float16 or float32"). INT8 keeps float32: one scale per row costs nothing.
W4 = WeightQuant(bits=4, group_size=128, symmetric=False, scale_dtype="float16")
# Against INT8 activations INT4 stores progressive scales (QServe's two levels: an INT8 scale a group times a
# float one a row), so its weights become INT8 in integers and prompts run on the W8A8 GEMM: the same decode
# speed as float16 group scales and up to 1.6x their prompt speed, 0.1 bits a weight smaller, perplexity equal
# after GPTQ or LKD (docs/results.md, "Progressive INT4 scales"). "+fp16scale" keeps float16 group scales.
W4_A8 = replace(W4, scale_dtype="int8")
A8 = ActQuant(bits=8, dynamic=True)


def _preset(name: str, attention: LinearRule, mlp: LinearRule) -> QuantConfig:
    return QuantConfig(attention=attention, mlp=mlp, name=name)


PRESETS: dict[str, QuantConfig] = {
    p.name: p
    for p in [
        # ZeroQuant: INT8 weights, token-wise dynamic INT8 activations.
        _preset("w8a8", LinearRule(W8, A8), LinearRule(W8, A8)),
        _preset("w8a16", LinearRule(W8), LinearRule(W8)),
        _preset("w4a16", LinearRule(W4), LinearRule(W4)),
        _preset("w4a8", LinearRule(W4_A8, A8), LinearRule(W4_A8, A8)),
        # Mixed precision: the MLP holds ~2/3 of the weights and tolerates INT4 better than attention.
        _preset("w4/8-a16", LinearRule(W8), LinearRule(W4)),
        _preset("w4/8-a8", LinearRule(W8, A8), LinearRule(W4_A8, A8)),
        # Baselines.
        _preset(
            "w8a8-static",
            LinearRule(WeightQuant(8, -1, True, per_tensor=True), ActQuant(8, dynamic=False, symmetric=False)),
            LinearRule(WeightQuant(8, -1, True, per_tensor=True), ActQuant(8, dynamic=False, symmetric=False)),
        ),
        _preset(
            "rtn-w4",
            LinearRule(WeightQuant(4, -1, symmetric=False)),
            LinearRule(WeightQuant(4, -1, symmetric=False)),
        ),
    ]
}


def with_group_size(config: QuantConfig, group_size: int) -> QuantConfig:
    """The same config with every group-wise weight rule set to `group_size` (per-tensor rules kept)."""

    def rule(r: LinearRule) -> LinearRule:
        if r.weight is None or r.weight.per_tensor:
            return r
        return replace(r, weight=replace(r.weight, group_size=group_size))

    suffix = "ch" if group_size == -1 else f"g{group_size}"
    return replace(config, attention=rule(config.attention), mlp=rule(config.mlp), name=f"{config.name}-{suffix}")


def with_rounding(config: QuantConfig, rounding: str) -> QuantConfig:
    """The same config with every weight rule rounded by `rounding` ("rtn" or "gptq")."""

    def rule(r: LinearRule) -> LinearRule:
        return r if r.weight is None else replace(r, rounding=rounding)

    name = config.name if rounding == "rtn" else f"{config.name}+{rounding}"
    return replace(config, attention=rule(config.attention), mlp=rule(config.mlp), name=name)


def with_scale_dtype(config: QuantConfig, scale_dtype: str) -> QuantConfig:
    """The same config with every weight rule's scales and zero points stored in `scale_dtype` ("float32" or
    "float16"); "int8" (progressive) applies to the 4-bit asymmetric group-wise rules and keeps the others."""

    def takes(w: WeightQuant) -> bool:
        return scale_dtype != "int8" or (w.bits == 4 and not w.symmetric and not w.per_tensor)

    def rule(r: LinearRule) -> LinearRule:
        if r.weight is None or not takes(r.weight):
            return r
        return replace(r, weight=replace(r.weight, scale_dtype=scale_dtype))

    if not any(r.weight is not None and takes(r.weight) for r in (config.attention, config.mlp)):
        raise ZeroQuantError(f"+{SCALE_SUFFIXES[scale_dtype]} needs 4-bit asymmetric group-wise weights; "
                             f"{config.name!r} has none")

    name = f"{config.name}+{SCALE_SUFFIXES[scale_dtype]}"
    return replace(config, attention=rule(config.attention), mlp=rule(config.mlp), name=name)


def with_smoothing(config: QuantConfig, smooth: float | str = "auto") -> QuantConfig:
    """The same config with SmoothQuant smoothing ("auto": alpha searched per site; or a fixed alpha). Refused
    for a weight-only config: smoothing moves activation outliers into weights, which helps only where
    activations are quantized, and the name would record a step that never ran."""
    if not any(r.act is not None for r in (config.attention, config.mlp)):
        raise ZeroQuantError(f"+smooth does nothing for {config.name!r}: it quantizes no activations (smoothing "
                             "applies to presets with INT8 activations, e.g. w8a8+smooth)")
    tag = "+smooth" if smooth == "auto" else f"+smooth{smooth:g}"
    return replace(config, smooth=smooth, name=config.name + tag)


def resolve_config(config: QuantConfig | str) -> QuantConfig:
    """A QuantConfig, a preset name, or a preset name with a group-size suffix: "-gN" (N input channels
    per scale) or "-ch" (one scale per output channel), e.g. "w8a8-ch", "w4a16-g64"; then "+gptq" for GPTQ
    rounding of every weight rule, "+smooth" for SmoothQuant smoothing with alpha searched ("+smooth0.5"
    fixes it), "+fp16scale" / "+fp32scale" for how scales and zero points are stored, in any order, e.g.
    "w4a16-g64+gptq", "w8a8+smooth"."""
    if isinstance(config, QuantConfig):
        return config
    key = str(config).lower()
    base, plus, last = key.rpartition("+")
    if plus and last == "gptq":
        return with_rounding(resolve_config(base), "gptq")
    by_suffix = {v: k for k, v in SCALE_SUFFIXES.items()}
    if plus and last in by_suffix:
        return with_scale_dtype(resolve_config(base), by_suffix[last])
    if plus and last.startswith("smooth"):
        alpha = last.removeprefix("smooth")
        try:
            value = float(alpha) if alpha else "auto"
        except ValueError:
            value = None  # not an alpha: the name falls through to the unknown-preset error
        if value is not None:
            return with_smoothing(resolve_config(base), value)
    if key in PRESETS:
        return PRESETS[key]
    base, _, suffix = key.rpartition("-")
    if base in PRESETS and (suffix == "ch" or (suffix[:1] == "g" and suffix[1:].isdigit() and int(suffix[1:]) > 0)):
        return with_group_size(PRESETS[base], -1 if suffix == "ch" else int(suffix[1:]))
    raise ZeroQuantError(f"unknown preset {config!r}; choose one of: {', '.join(PRESETS)} "
                         "(optionally with a group-size suffix: -g64, -ch for per channel; then +gptq, +smooth)")
