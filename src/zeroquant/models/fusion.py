"""Fuse the float ops around quantized linears inside a whole Hugging Face model (zeroquant.fuse): where each
fused module (zeroquant.nn.fused) goes, from the adapter table.

Rewrites driven by the adapter table (adapters.Arch), all exact on the reference path:
- norm -> token-wise INT8: a LayerNorm/RMSNorm whose output feeds only QuantLinears with token-wise
  INT8 activations becomes a FusedNorm. On CUDA it runs one kernel that writes the normalised output and
  its INT8 form, and hands the INT8 copy to those linears, which then skip their own quantization (Llama's
  q/k/v projections quantized the same tensor three times before). Elsewhere it is the plain norm.
- norm -> packed linears: in decoders, the linears a norm feeds that share a format (Llama's q/k/v, and
  gate/up where `down` takes INT8) run as one GEMM over their packed weights (zeroquant.nn.packing), run by the
  FusedNorm, which hands each linear its output (weight-only presets too: there the norm is torch ops).
- residual add -> norm: in a post-LN sublayer norm(linear(h) + residual) whose norm became a FusedNorm, the
  add moves into the norm's kernel (ResidualNorm).
- activation -> token-wise INT8: an MLP activation (GELU, SiLU, ReLU) whose output feeds an INT8-activation
  linear becomes a FusedAct: one row kernel applies it and writes only the INT8 form for that linear (the
  quantization pass is needed anyway).
- gated MLP -> token-wise INT8: in down(act(gate(x)) * up(x)) (Llama family) with an INT8-activation down
  projection, the activation, the product and its quantization run as one kernel that writes only the
  INT8 copy (GatedMLP).
- gated MLP -> packed GEMM: with weight-only gate/up of one format (w4a16), gate and up run as one GEMM over
  their packed weights (GatedMLP with glu); for one token that GEMV's epilogue computes act(gate) * up, so
  there is no separate up GEMV and no elementwise product; for more tokens the model's activation and
  product follow the one GEMM.
- encoder self-attention -> attention kernel: a bidirectional self-attention (BERT family) runs softmax(q k^T
  * scale + mask) v in one Triton kernel that reads Hugging Face's expanded mask through its strides (torch's
  SDPA converts a boolean mask on every call). Everything else (CPU, training, caches, cross-attention,
  masks it does not know) takes the model's own forward.
- activation -> GEMM epilogue: otherwise (weight-only presets, ungated MLPs) the MLP activation moves into the
  preceding QuantLinear (its `act`), which applies it to its float32 output in every mode: inside the
  kernel's epilogue on CUDA. The model's own activation module becomes nn.Identity.
Parameter names do not change, so state dicts, checkpoints and LKD see the same model.
"""

from __future__ import annotations

from torch import nn

from zeroquant.models.adapters import base_model, get_arch, get_blocks, is_encoder, norms_apply
from zeroquant.models.encoder_attention import EncoderAttention
from zeroquant.nn import packing
from zeroquant.nn.fused import FusedAct, FusedNorm, GatedMLP, ResidualNorm
from zeroquant.nn.qlinear import QuantLinear

# Hugging Face activation modules -> the kernels' activation names (transformers.activations).
_ACTS = {
    "GELUActivation": "gelu", "GELU": "gelu",
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "SiLUActivation": "silu", "SiLU": "silu",
    "ReLU": "relu",
}



def norm_eps(module: nn.Module, kind: str) -> float | None:
    """The eps of a norm the fused kernel computes exactly (the adapter says which kind), else None."""
    if kind == "layernorm":
        ok = isinstance(module, nn.LayerNorm) and module.weight is not None and len(module.normalized_shape) == 1
        return module.eps if ok else None
    eps = getattr(module, "variance_epsilon", None)  # Hugging Face's Llama-family RMSNorm
    return eps if isinstance(getattr(module, "weight", None), nn.Parameter) else None


def _fuse_self_attention(block: nn.Module, path: str, query: str, key: str, value: str) -> bool:
    attn = block.get_submodule(path)
    if isinstance(attn, EncoderAttention):
        return False
    block.set_submodule(path, EncoderAttention(attn, query, key, value))
    return True


def _fuse_residual(block: nn.Module, sub: str, linear: str, dropout: str, norm: str) -> bool:
    module = block.get_submodule(sub)
    if isinstance(module, ResidualNorm) or not isinstance(module.get_submodule(norm), FusedNorm):
        return False  # only a FusedNorm takes the residual (the last block's output norm stays as it is)
    block.set_submodule(sub, ResidualNorm(module, linear, dropout, norm))
    return True


def _fuse_gated_mlp(block: nn.Module, path: str, gate: str, up: str, down: str, act_name: str) -> str | None:
    """GatedMLP where the kernels can fuse the activation and product: into the quantization for an INT8
    `down`, or (weight-only gate/up of one format, a known activation) into the packed gate/up GEMM.
    Returns which, or None."""
    mlp = block.get_submodule(path)
    if isinstance(mlp, GatedMLP) or not hasattr(mlp, act_name):
        return None
    g, u = mlp.get_submodule(gate), mlp.get_submodule(up)
    if isinstance(g, QuantLinear) and g.act is not None:
        return None  # a model fused before GatedMLP existed keeps its epilogue activation
    act = _ACTS.get(type(mlp.get_submodule(act_name)).__name__)
    if _takes_int8(mlp.get_submodule(down)):
        block.set_submodule(path, GatedMLP(mlp, gate, up, down, act_name, act))
        return "gate*up->quant"
    if act and packing.packable([g, u]) and g.aq is None and g.kernel_format:
        block.set_submodule(path, GatedMLP(mlp, gate, up, down, act_name, act, glu=True))
        return "gate*up->epilogue"
    return None


def _takes_int8(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear) and m.aq is not None and m.aq.dynamic and m.aq.bits == 8


def _fuse_norm(owner: nn.Module, name: str, kind: str, consumers: list[nn.Module], pack: bool) -> list[str]:
    """Replace the norm by a FusedNorm where it has something to hand over: INT8 copies (every consumer takes
    them) and/or, with `pack`, the outputs of two or more linears of one format. Returns what it hands over."""
    norm = owner.get_submodule(name)
    if isinstance(norm, FusedNorm):
        return []
    int8 = all(_takes_int8(c) for c in consumers)
    pack = pack and len(consumers) > 1 and packing.packable(consumers) and consumers[0].kernel_format
    eps = norm_eps(norm, kind)
    if not (int8 or pack) or eps is None:
        return []
    for i, c in enumerate(consumers):
        c.packed_slot = i if pack else None
    owner.set_submodule(name, FusedNorm(norm, kind, eps, consumers, pack))
    return ["norm->quant"] * int8 + ["norm->packed"] * pack


def _fuse_act(block: nn.Module, act_name: str, linear_name: str, consumer_name: str | None) -> str | None:
    """Move the activation into the consumer's quantization (when it takes INT8) or else into the producer's
    epilogue; returns which, or None."""
    act, linear = block.get_submodule(act_name), block.get_submodule(linear_name)
    name = _ACTS.get(type(act).__name__)
    if name is None or not isinstance(linear, QuantLinear) or linear.act is not None:
        return None
    consumer = block.get_submodule(consumer_name) if consumer_name else None
    if consumer is not None and _takes_int8(consumer):
        block.set_submodule(act_name, FusedAct(name, consumer))
        return "act->quant"
    linear.act = name
    block.set_submodule(act_name, nn.Identity())
    return "act->epilogue"


def fuse(model: nn.Module) -> dict[str, int]:
    """Apply the rewrites in place wherever the adapter allows them; returns how many of each were made.

    Idempotent. Models without an adapter (the generic fallback) are left as they are.
    """
    arch = get_arch(model, allow_generic=True)
    done = {"norm->quant": 0, "norm->packed": 0, "residual->norm": 0, "act->epilogue": 0, "act->quant": 0,
            "gate*up->quant": 0, "gate*up->epilogue": 0, "attention->kernel": 0}
    if arch is None:
        return done
    blocks = get_blocks(model)
    # BERT-style encoders (not configured as decoders) run q/k/v packed in EncoderAttention
    encoder = is_encoder(model, arch)
    # Activations before norms: an activation moved into a GEMM epilogue leaves that linear out of a packed GEMM.
    for block in blocks:
        if encoder:
            done["attention->kernel"] += _fuse_self_attention(block, *arch.self_attention)
        # Gated MLPs first: their activation belongs to their kernel, not to gate's epilogue.
        if arch.gated_mlp is not None:
            how = _fuse_gated_mlp(block, *arch.gated_mlp)
            if how:
                done[how] += 1
            if isinstance(block.get_submodule(arch.gated_mlp[0]), GatedMLP):
                continue
        if arch.mlp_act is not None:  # a FusedAct is no activation _ACTS knows: left as it is
            how = _fuse_act(block, *arch.mlp_act)
            if how:
                done[how] += 1
    if not norms_apply(model, arch):
        return done
    # Elsewhere linears that read one norm's output run packed from that norm, unless a GatedMLP runs them packed.
    glu = {id(getattr(m, n)) for m in model.modules() if isinstance(m, GatedMLP) and m.glu for n in m.names[:2]}

    def fuse_norm(owner: nn.Module, name: str, consumers: list[nn.Module]) -> None:
        pack = not encoder and not any(id(c) in glu for c in consumers)
        for what in _fuse_norm(owner, name, arch.norm, consumers, pack):
            done[what] += 1

    if arch.norm_feeds_first is not None and len(blocks):
        name, linears = arch.norm_feeds_first
        fuse_norm(base_model(model), name, [blocks[0].get_submodule(n) for n in linears])
    for i, block in enumerate(blocks):
        for name, linears in arch.norm_feeds.items():
            fuse_norm(block, name, [block.get_submodule(n) for n in linears])
        if i + 1 < len(blocks):
            for name, linears in arch.norm_feeds_next.items():
                fuse_norm(block, name, [blocks[i + 1].get_submodule(n) for n in linears])
        for entry in arch.residual_norm:
            done["residual->norm"] += _fuse_residual(block, *entry)
    return done
