"""Architecture knowledge in one table: where the blocks are, which linears are attention vs MLP,
and which norm feeds which linears (for norm->quant fusion). Nothing else in the package looks at
module names."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from zeroquant.core.errors import ZeroQuantError


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a GPT-2 Conv1D (which stores [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear that stores its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path from model.base_model to the nn.ModuleList of transformer blocks
    attention: tuple[str, ...]  # linears of a block, relative to the block
    mlp: tuple[str, ...]
    # norm (relative to the block) -> the linears whose input is exactly that norm's output
    norm_feeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the same for a norm whose output feeds linears of the *next* block (post-LN encoders)
    norm_feeds_next: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (sublayer, linear, dropout, norm) of post-LN sublayers computing norm(dropout(linear(h)) + residual) in
    # forward(h, residual): the add can run inside the norm's kernel
    residual_norm: tuple[tuple[str, str, str, str], ...] = ()
    # (activation module, linear whose output is its only input, linear whose only input is its output or
    # None): the activation can move into the first linear's GEMM epilogue, or into the second's token-wise
    # quantization
    mlp_act: tuple[str, str, str | None] | None = None
    # (MLP module, gate, up, down, activation module) relative to the MLP, for gated MLPs computing
    # down(act(gate(x)) * up(x)): the product and the down projection's token-wise quantization can run as one kernel
    gated_mlp: tuple[str, str, str, str, str] | None = None
    # (norm relative to model.base_model, linears of the first block) for a norm before the first block whose
    # output is exactly those linears' input (BERT's embedding LayerNorm feeds block 0's q/k/v)
    norm_feeds_first: tuple[str, tuple[str, ...]] | None = None
    # (self-attention module, query, key, value) of a bidirectional encoder block in BERT's convention
    # (num_attention_heads, attention_head_size, forward(hidden_states, attention_mask, ...) -> (out, weights)):
    # it can run on zeroquant's attention kernel (not for configs with is_decoder set)
    self_attention: tuple[str, str, str, str] | None = None
    # a boolean config attribute that must be true for norm_feeds to hold (OPT-350m is post-LN)
    norm_feeds_when: str | None = None
    # what the norms compute: "layernorm" (torch's) or "rmsnorm" (weight * x * rsqrt(mean(x^2) + eps))
    norm: str = "layernorm"
    # whether norm_feeds' norms are pre-LN, their output reaching those linears and nothing else (not the
    # residual stream): then a per-channel scale folds exactly from the norm into the linears
    # (zeroquant.algorithms.smooth)
    norm_feeds_only: bool = True
    # (linear, consumers): linears whose output channels reach the consumers' input channels one to one through
    # steps that commute with a positive per-channel scale (the attention-weighted sum of V, the gate product),
    # so the same fold is exact (not v -> o under grouped-query attention, where V channels are shared)
    smooth_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()


_BERT = Arch(
    blocks="encoder.layer",
    attention=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    mlp=("intermediate.dense", "output.dense"),
    # Post-LN: the attention output's LayerNorm is the FFN input, and the block's output LayerNorm is the
    # next block's QKV input; block 0's QKV input is the embeddings' LayerNorm (dropout is the identity at inference).
    norm_feeds={"attention.output.LayerNorm": ("intermediate.dense",)},
    norm_feeds_next={"output.LayerNorm": ("attention.self.query", "attention.self.key", "attention.self.value")},
    norm_feeds_first=("embeddings.LayerNorm", ("attention.self.query", "attention.self.key", "attention.self.value")),
    self_attention=("attention.self", "query", "key", "value"),
    residual_norm=(("attention.output", "dense", "dropout", "LayerNorm"), ("output", "dense", "dropout", "LayerNorm")),
    mlp_act=("intermediate.intermediate_act_fn", "intermediate.dense", "output.dense"),
    norm_feeds_only=False,
    smooth_linears=(("attention.self.value", ("attention.output.dense",)),),
)
_LLAMA = Arch(
    blocks="layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norm_feeds={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    # down_proj(act_fn(gate_proj(x)) * up_proj(x)): the activation applies to gate_proj's output alone
    mlp_act=("mlp.act_fn", "mlp.gate_proj", None),
    gated_mlp=("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"),
    norm="rmsnorm",
    smooth_linears=(("mlp.up_proj", ("mlp.down_proj",)),),
)

ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "gpt2": Arch(
        blocks="h",
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        norm_feeds={"ln_1": ("attn.c_attn",), "ln_2": ("mlp.c_fc",)},
        mlp_act=("mlp.act", "mlp.c_fc", "mlp.c_proj"),
    ),
    "opt": Arch(
        blocks="decoder.layers",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
        # Only valid for pre-LN OPT (every size but 350m).
        norm_feeds={
            "self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "final_layer_norm": ("fc1",),
        },
        mlp_act=("activation_fn", "fc1", "fc2"),
        norm_feeds_when="do_layer_norm_before",
        smooth_linears=(("self_attn.v_proj", ("self_attn.out_proj",)),),
    ),
    "gpt_neox": Arch(
        blocks="layers",
        attention=("attention.query_key_value", "attention.dense"),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        norm_feeds={"input_layernorm": ("attention.query_key_value",),
                    "post_attention_layernorm": ("mlp.dense_h_to_4h",)},
        mlp_act=("mlp.act", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "gptj": Arch(
        blocks="h",
        attention=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
        mlp=("mlp.fc_in", "mlp.fc_out"),
        # Parallel attention + MLP: one LayerNorm feeds both.
        norm_feeds={"ln_1": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")},
        mlp_act=("mlp.act", "mlp.fc_in", "mlp.fc_out"),
        smooth_linears=(("attn.v_proj", ("attn.out_proj",)),),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def arch_for(model_type: str | None, allow_generic: bool = False) -> Arch | None:
    """The adapter for a config.model_type; None means the opt-in generic fallback."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if allow_generic:
        return None
    raise ZeroQuantError(
        f"unsupported architecture {model_type!r}; supported: {supported()} "
        "(or opt into the generic fallback: allow_generic=True / --generic)"
    )


def get_arch(model: nn.Module, allow_generic: bool = False) -> Arch | None:
    return arch_for(getattr(getattr(model, "config", None), "model_type", None), allow_generic)


def is_encoder(model: nn.Module, arch: Arch) -> bool:
    """A BERT-style encoder (self_attention in the adapter, not configured as a decoder): its attention runs on
    zeroquant's encoder attention kernel."""
    return arch.self_attention is not None and not getattr(model.config, "is_decoder", False)


def norms_apply(model: nn.Module, arch: Arch) -> bool:
    """Whether norm_feeds holds for this model (its norm_feeds_when config flag, where it has one)."""
    return arch.norm_feeds_when is None or bool(getattr(model.config, arch.norm_feeds_when, True))


def smoothing_pairs(model: nn.Module, arch: Arch | None) -> list[tuple[str, tuple[str, ...]]]:
    """(source, consumers) of each block where a per-channel scale folds exactly (zeroquant.algorithms.smooth)."""
    if arch is None:
        return []
    norms = list(arch.norm_feeds.items()) if arch.norm_feeds_only and norms_apply(model, arch) else []
    return norms + list(arch.smooth_linears)


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _generic_blocks(model: nn.Module) -> nn.ModuleList:
    """The largest ModuleList of identical modules: the transformer stack in every model we know."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise ZeroQuantError("generic fallback found no nn.ModuleList of blocks in this model")
    return best


def get_blocks(model: nn.Module, allow_generic: bool = False) -> nn.ModuleList:
    arch = get_arch(model, allow_generic)
    if arch is None:
        return _generic_blocks(model)
    return base_model(model).get_submodule(arch.blocks)


def blocks_name(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The dotted name of `blocks` (get_blocks' list) in `model`: the prefix of every block parameter's name."""
    return {id(m): n for n, m in model.named_modules()}[id(blocks)]


def block_linears(block: nn.Module, arch: Arch | None) -> Iterator[tuple[str, str, nn.Module]]:
    """(name relative to block, kind, module) for each quantizable linear of a block.

    The generic fallback takes every linear in the block and gives it the attention rule, the more
    conservative one in every preset.
    """
    if arch is None:
        for name, m in block.named_modules():
            if is_linear(m):
                yield name, "attention", m
        return
    for kind, names in (("attention", arch.attention), ("mlp", arch.mlp)):
        for name in names:
            yield name, kind, block.get_submodule(name)

