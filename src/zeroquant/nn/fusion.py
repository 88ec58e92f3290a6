"""Fuse the float ops around quantized linears inside a whole model (zeroquant.fuse).

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
- decoder attention -> one-query kernel: a decoder on transformers' SDPA attention runs its decode steps' attention
  (one query against the KV cache) on kernels.attention's decode kernel (zeroquant.models.hf_attention); prompts and
  everything else stay on SDPA.
- activation -> GEMM epilogue: otherwise (weight-only presets, ungated MLPs) the MLP activation moves into the
  preceding QuantLinear (its `act`), which applies it to its float32 output in every mode: inside the
  kernel's epilogue on CUDA. The model's own activation module becomes nn.Identity.
Parameter names do not change, so state dicts, checkpoints and LKD see the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from zeroquant import kernels
from zeroquant.kernels import ops, reference
from zeroquant.models.adapters import base_model, get_arch, get_blocks, norms_apply
from zeroquant.models.hf_attention import use_kernel_attention
from zeroquant.nn import packing
from zeroquant.nn.handoff import QuantizedActivation
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


class FusedNorm(nn.Module):
    """LayerNorm/RMSNorm that hands the QuantLinears it feeds what they would compute from its output, as one
    QuantizedActivation (zeroquant.nn.handoff): its token-wise INT8 copy, made in the norm's kernel, where they
    take INT8; and, where `pack` is set and they share a format (zeroquant.nn.packing), their outputs from one GEMM
    over their packed weights (a decoder's q/k/v: one GEMM instead of three).

    Same parameters under the same names as the norm it replaces. Only on the kernel path at inference;
    otherwise this is the reference norm.
    """

    def __init__(self, norm: nn.Module, kind: str, eps: float, consumers: list[QuantLinear], pack: bool) -> None:
        super().__init__()
        self.kind, self.eps, self.pack = kind, eps, pack
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        # A tuple, not a ModuleList: the consumers belong to (and are saved with) their own parents.
        self.consumers = tuple(consumers)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or norm(x + residual) with the add inside the same kernel (ResidualNorm)."""
        if _inference(x):
            int8 = any(c.takes_int8(x) for c in self.consumers)
            packed = self._packed(x)
            if int8 or packed is not None:
                if int8:
                    y, q, s = ops.norm_quant(x, self.weight, self.bias, self.eps, self.kind, residual)
                else:
                    y, q, s = self._norm(x, residual), None, None
                outs = None if packed is None else packed_linears(packed, list(self.consumers), y,
                                                                  None if q is None else (q, s))
                return QuantizedActivation(y, q, s, outputs=outs)
        return self._norm(x, residual)

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return reference.norm(x if residual is None else x + residual, self.weight, self.bias, self.eps, self.kind)

    def _packed(self, x: torch.Tensor) -> dict | None:
        return packing.cached_pack(self, list(self.consumers), x) if self.pack else None

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        how = ", packed" if self.pack else ""
        return f"{self.kind}, eps={self.eps}, feeds {len(self.consumers)} quantized linear(s){how}"


def _inference(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


class FusedAct(nn.Module):
    """An MLP activation whose output feeds one INT8-activation linear: on CUDA, one row kernel reads the
    first linear's output, applies the activation, writes only its token-wise INT8 form, and hands that to
    the second linear. In the first GEMM's epilogue erf GELU stalls the tensor cores; here it adds a little
    to a pass the quantization needs anyway (docs/history.md, kernel choices).

    The float activation is never written: the adapter's mlp_act entry says the consumer is its only
    reader, so forward returns a QuantizedActivation holding only the INT8 form (zeroquant.nn.handoff); any
    other reader raises. Elsewhere (CPU, training) it computes the same activation in
    float32, as an epilogue would."""

    def __init__(self, name: str, consumer: QuantLinear) -> None:
        super().__init__()
        self.name = name
        self.consumer = (consumer,)  # a tuple: the consumer belongs to (and is saved with) its own parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (c,) = self.consumer
        if _inference(x) and c.takes_int8(x):
            q, s = ops.act_quant(x, self.name)
            return QuantizedActivation(None, q, s, dtype=x.dtype)
        # In float32 like the kernel (and like an epilogue activation): GPT-2's own gelu_new rounds to fp16
        # after every op, which the reference path must not add on top of quantization error.
        return reference.apply_act(x.float(), self.name).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}, quantized for the next linear"


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with its activation and product fused into a kernel on CUDA.

    Where `down` takes INT8, the activation, product and token-wise INT8 quantization for `down` run as one
    row kernel; the float product is never written. With `glu` (weight-only formats), gate and up run as one
    GEMM over their packed weights (zeroquant.nn.packing); for one token (decode at batch 1) that GEMM's
    epilogue applies the activation and the product (ops.gated_linear: one kernel instead of two GEMVs and
    an elementwise product), for more tokens the model's activation and product follow it.

    Holds the original MLP's gate/up/down linears and activation module under their own names, so
    parameter names do not change. `act` names the activation for the kernel (None: unknown to the
    kernels, so the model's own module applies it first).
    """

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, act: str | None, glu: bool = False) -> None:
        super().__init__()
        self.names, self.act, self.glu = (gate, up, down), act, glu
        for n in self.names:
            self.add_module(n, mlp.get_submodule(n))
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        if self.glu and _inference(x):
            packed = packing.cached_pack(self, [gate, up], x)
            if packed is not None:
                if x.shape[:-1].numel() == 1:
                    return down(ops.gated_linear(x, None, *_packed_weight(packed, gate), self.act, x.dtype))
                g, u = packed_linears(packed, [gate, up], x)  # one GEMM; the product outside (inductor fuses it)
                return down(self.act_fn(g) * u)
        g, u = gate(x), up(x)
        if _inference(x) and down.takes_int8(g):
            q, s = ops.act_quant(g if self.act else self.act_fn(g), self.act, u)
            return down.forward_quantized(q, s, g.dtype)
        return down(self.act_fn(g) * u)

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        if self.glu:
            return f"act={self.act}, {self.names[0]} and {self.names[1]} as one GEMM with the product in its epilogue"
        return f"act={self.act}, quantized with the product for {self.names[2]}"


class ResidualNorm(nn.Module):
    """A post-LN sublayer, norm(dropout(linear(h)) + residual) (BERT's BertSelfOutput and BertOutput),
    whose residual add runs in its FusedNorm's kernel: one pass over the tensor instead of an add kernel
    (read two, write one) before the norm. Holds the sublayer's own modules under their own names."""

    def __init__(self, sub: nn.Module, linear: str, dropout: str, norm: str) -> None:
        super().__init__()
        self.names = (linear, dropout, norm)
        for n, m in sub.named_children():
            self.add_module(n, m)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        linear, dropout, norm = (getattr(self, n) for n in self.names)
        return norm(dropout(linear(hidden_states)), residual=input_tensor)

    def extra_repr(self) -> str:
        return f"{self.names[2]}({self.names[1]}({self.names[0]}(h)) + residual), add fused into the norm"


def _packed_weight(packed: dict[str, torch.Tensor | None], first: QuantLinear) -> tuple:
    """The weight arguments of ops.quant_linear / ops.gated_linear for packed buffers (packing.packed_buffers):
    qweight, w_scale, w_zero, bits, group_size, bias."""
    zero = None if packed["w_zero"] is None else packed["w_zero"].t()
    return packed["qweight"], packed["w_scale"].t(), zero, first.wq.bits, first.group_size, packed["bias"]


def packed_linears(packed: dict[str, torch.Tensor | None], linears: list[QuantLinear], x: torch.Tensor,
                   int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each linear's output from one kernel GEMM over their packed buffers (packing.packed_buffers): x [..., K],
    or its token-wise INT8 form `int8` where the caller already has it."""
    first = linears[0]
    q8, s = (x, None) if first.aq is None else (int8 or first.int8_input(x))
    y = ops.quant_linear(q8, s, *_packed_weight(packed, first), None, x.dtype)
    return list(y.split([m.out_features for m in linears], -1))


class EncoderAttention(nn.Module):
    """A bidirectional self-attention whose softmax(q k^T * scale + mask) v runs on zeroquant's attention
    kernel (kernels.attention) on CUDA at inference. Holds the original module's children under their own
    names; anything the kernel does not cover takes the original module's forward, on the same children."""

    def __init__(self, attn: nn.Module, query: str, key: str, value: str) -> None:
        super().__init__()
        self.names = (query, key, value)
        for n, m in attn.named_children():
            self.add_module(n, m)
        self.heads, self.head_dim = attn.num_attention_heads, attn.attention_head_size
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.original = (attn,)  # a tuple: not a submodule, so parameter names stay the same
        self.train(attn.training)

    def _kernel_mask(self, mask: object) -> tuple[bool, torch.Tensor | None]:
        """(whether the kernel takes this mask, the mask in a form it reads)."""
        if mask is None:
            return True, None
        if not isinstance(mask, torch.Tensor):
            return False, None  # e.g. flex attention's BlockMask
        if mask.dim() == 2:  # [B, Sk] padding mask (flash-attention implementations pass it as it is)
            return True, mask.bool()[:, None, None, :]
        return mask.dim() == 4, mask

    def forward(self, hidden_states: torch.Tensor, attention_mask: object = None, past_key_values: object = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        # set_mode(model, "ref"|"fake") on the projections sends the whole attention to the reference path
        ref = any(isinstance(getattr(self, n), QuantLinear) and getattr(self, n).mode != "int" for n in self.names)
        fast = (not ref and _inference(hidden_states) and kernels.runs_on(hidden_states)
                and hidden_states.dtype in (torch.float16, torch.bfloat16) and past_key_values is None
                and kwargs.get("encoder_hidden_states") is None and not kwargs.get("output_attentions"))
        ok, mask = self._kernel_mask(attention_mask) if fast else (False, None)
        if not ok:
            (orig,) = self.original
            for n, m in self.named_children():  # the original forward must see this module's children
                orig._modules[n] = m
            orig.train(self.training)
            return orig(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        lead = hidden_states.shape[:-1]
        proj = self._packed_projection(hidden_states)
        if proj is None:
            proj = [getattr(self, n)(hidden_states) for n in self.names]
        q, k, v = (p.view(*lead, -1, self.head_dim).transpose(1, 2) for p in proj)
        out = ops.attention(q, k, v, mask, self.scaling)
        return out.transpose(1, 2).reshape(*lead, -1), None

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def _packed_projection(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """q, k and v from one GEMM over their packed weights (zeroquant.nn.packing; faster than three GEMMs:
        docs/history.md, kernel choices), packing them on first use; None where the kernels cannot."""
        lins = [getattr(self, n) for n in self.names]
        packed = packing.cached_pack(self, lins, x)
        return None if packed is None else packed_linears(packed, lins, x)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, on the attention kernel where it applies"


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


def _fuse_gated_mlp(block: nn.Module, path: str, gate: str, up: str, down: str) -> str | None:
    """GatedMLP where the kernels can fuse the activation and product: into the quantization for an INT8
    `down`, or (weight-only gate/up of one format, a known activation) into the packed gate/up GEMM.
    Returns which, or None."""
    mlp = block.get_submodule(path)
    if isinstance(mlp, GatedMLP) or not hasattr(mlp, "act_fn"):
        return None
    g, u = mlp.get_submodule(gate), mlp.get_submodule(up)
    if isinstance(g, QuantLinear) and g.act is not None:
        return None  # a model fused before GatedMLP existed keeps its epilogue activation
    act = _ACTS.get(type(mlp.act_fn).__name__)
    if _takes_int8(mlp.get_submodule(down)):
        block.set_submodule(path, GatedMLP(mlp, gate, up, down, act))
        return "gate*up->quant"
    if act and packing.packable([g, u]) and g.aq is None and g.kernel_format:
        block.set_submodule(path, GatedMLP(mlp, gate, up, down, act, glu=True))
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
    encoder = arch.self_attention is not None and not getattr(model.config, "is_decoder", False)
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
    if not encoder and use_kernel_attention(model):
        done["attention->kernel"] += len(blocks)
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
