"""zeroquant.models.fusion on CPU: the fused model computes what the unfused one does, with the same parameters."""

import json

import pytest
import torch
from tiny_models import model_output, tiny_input, tiny_model
from torch import nn

import zeroquant as zq
from zeroquant.core.config import LinearRule, QuantConfig, WeightQuant, resolve_config, with_group_size
from zeroquant.formats import checkpoint
from zeroquant.models.fusion import fuse
from zeroquant.nn.fused import FusedAct, FusedNorm, GatedMLP, ResidualNorm

# per 2-block model under w4/8-a8 (INT8 activations everywhere): fused norms, activations moved into the next
# linear's quantization, fused gated MLPs, epilogue activations, residual adds moved into fused norms,
# encoder self-attentions on the attention kernel (BERT: the embeddings' LayerNorm is the fourth fused norm; a
# decoder's attention is pointed at its kernel apart from fuse(): models.hf_attention), decoder
# norms running their linears as one packed GEMM (Llama: q/k/v and gate/up; OPT: q/k/v; GPT-J's ln_1 feeds INT8
# attention and INT4 MLP linears, which do not pack; encoders pack q/k/v in their attention instead)
EXPECTED = {"llama": (4, 0, 2, 0, 0, 0, 4), "qwen2": (4, 0, 2, 0, 0, 0, 4), "opt": (4, 2, 0, 0, 0, 0, 2),
            "gpt2": (4, 2, 0, 0, 0, 0), "gpt_neox": (4, 2, 0, 0, 0, 0), "gptj": (2, 2, 0, 0, 0, 0),
            "bert": (4, 2, 0, 0, 3, 2),
            "roberta": (4, 2, 0, 0, 3, 2)}
NONE = {"norm->quant": 0, "norm->packed": 0, "residual->norm": 0, "act->epilogue": 0, "act->quant": 0,
        "gate*up->quant": 0, "gate*up->epilogue": 0, "attention->kernel": 0}


def counts(norms: int, act_quant: int, gated: int, epilogue: int = 0, residual: int = 0,
           attention: int = 0, packed: int = 0, glu: int = 0) -> dict[str, int]:
    return {"norm->quant": norms, "norm->packed": packed, "residual->norm": residual, "act->epilogue": epilogue,
            "act->quant": act_quant, "gate*up->quant": gated, "gate*up->epilogue": glu, "attention->kernel": attention}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_fused_model_matches_unfused(arch):
    model, ids = tiny_model(arch), tiny_input()
    plain = zq.quantize(model, "w4/8-a8", progress=False, fuse=False)
    fused = zq.quantize(model, "w4/8-a8", progress=False, fuse=False)
    assert fuse(fused) == counts(*EXPECTED[arch])
    assert fuse(fused) == NONE  # idempotent
    assert sum(isinstance(m, FusedNorm) for m in fused.modules()) == EXPECTED[arch][0]
    assert sum(isinstance(m, GatedMLP) for m in fused.modules()) == EXPECTED[arch][2]
    assert sum(isinstance(m, ResidualNorm) for m in fused.modules()) == counts(*EXPECTED[arch])["residual->norm"]
    assert sorted(fused.state_dict()) == sorted(plain.state_dict())
    a, b = model_output(plain, ids), model_output(fused, ids)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_weight_only_presets_pack_qkv_behind_the_norm_and_gate_up_in_the_mlp():
    q = zq.quantize(tiny_model("llama"), "w4a16", progress=False)
    norms = [m for m in q.modules() if isinstance(m, FusedNorm)]
    # q/k/v pack behind the input norm; gate and up pack in their GatedMLP, so the second norm stays plain
    assert len(norms) == 2 and all(n.pack for n in norms)
    assert [n.consumers for n in norms] == [tuple(b.self_attn.get_submodule(p) for p in ("q_proj", "k_proj", "v_proj"))
                                            for b in q.model.layers]
    mlp = q.model.layers[0].mlp
    assert isinstance(mlp, GatedMLP) and mlp.glu and mlp.act == "silu"
    assert mlp.gate_proj.act is None and mlp.gate_proj.packed_slot is None and mlp.up_proj.packed_slot is None
    assert not isinstance(q.model.layers[0].post_attention_layernorm, FusedNorm)


def test_gated_mlp_fuses_into_the_quantization_or_the_packed_gemm():
    fused = fuse(zq.quantize(tiny_model("llama"), "w4a16", progress=False, fuse=False))
    assert fused == counts(0, 0, 0, packed=2, glu=2)
    # weights the kernels do not take (per-tensor) cannot run packed: the activation goes to gate's epilogue
    rule = LinearRule(WeightQuant(8, -1, True, per_tensor=True))
    per_tensor = fuse(zq.quantize(tiny_model("llama"), QuantConfig(rule, rule), progress=False, fuse=False))
    assert per_tensor == counts(0, 0, 0, epilogue=2)
    q = zq.quantize(tiny_model("llama"), "w4/8-a8", progress=False)
    mlp = q.model.layers[0].mlp
    assert isinstance(mlp, GatedMLP) and not mlp.glu and mlp.act == "silu" and mlp.gate_proj.act is None
    x = torch.randn(2, 5, 64)
    with torch.no_grad():  # the reference path: down(act(gate(x)) * up(x))
        want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), want)


def test_activation_goes_to_the_next_linears_quantization_or_else_the_epilogue():
    q8 = zq.quantize(tiny_model("bert"), "w8a8", progress=False)
    act = q8.encoder.layer[0].intermediate.intermediate_act_fn
    assert isinstance(act, FusedAct) and act.name == "gelu" and act.consumer[0] is q8.encoder.layer[0].output.dense
    assert q8.encoder.layer[0].intermediate.dense.act is None
    q16 = zq.quantize(tiny_model("bert"), "w8a16", progress=False)
    assert q16.encoder.layer[0].intermediate.dense.act == "gelu"
    assert isinstance(q16.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)


def test_post_ln_residual_add_moves_into_the_fused_norm():
    q = zq.quantize(tiny_model("bert"), "w8a8", progress=False)
    first, last = q.encoder.layer[0], q.encoder.layer[-1]
    assert isinstance(first.attention.output, ResidualNorm) and isinstance(first.output, ResidualNorm)
    assert first.output.LayerNorm.consumers[0] is q.encoder.layer[1].attention.self.query  # the next block's QKV
    # The last block's output norm feeds no quantized linear: it stays a plain LayerNorm and keeps its add.
    assert not isinstance(last.output, ResidualNorm) and isinstance(last.output.LayerNorm, nn.LayerNorm)
    h, r = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        sub = first.attention.output
        want = nn.functional.layer_norm(sub.dense(h) + r, (64,), sub.LayerNorm.weight, sub.LayerNorm.bias,
                                        sub.LayerNorm.eps)
        assert torch.equal(sub(h, r), want)


def test_post_ln_opt_keeps_its_norms():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False
    q = zq.quantize(model, "w8a8", progress=False, fuse=False)
    assert fuse(q) == counts(0, 2, 0)  # no fused norms; the activations still go to fc2's quantization


def test_norm_hands_int8_only_to_linears_that_take_it():
    """On CPU nothing is handed over: consumers quantize for themselves (the reference path)."""
    q = zq.quantize(tiny_model("llama"), "w8a8", progress=False)
    norm = q.model.layers[0].input_layernorm
    assert isinstance(norm, FusedNorm) and norm.kind == "rmsnorm" and len(norm.consumers) == 3
    assert norm.consumers[0] is q.model.layers[0].self_attn.q_proj
    outputs = []
    norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    model_output(q, tiny_input())
    assert outputs and all(type(o) is torch.Tensor for o in outputs)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_saved_fused_model_loads_fused(tmp_path, arch):
    model, ids = tiny_model(arch), tiny_input()
    q = zq.quantize(model, "w8a8", progress=False)
    loaded = zq.load_quantized(zq.save_quantized(q, tmp_path / "q"))
    assert sum(isinstance(m, FusedNorm) for m in loaded.modules()) == EXPECTED[arch][0]
    assert torch.equal(model_output(q, ids), model_output(loaded, ids))


@pytest.mark.parametrize("preset", ["w4a16", "w4a8+fp16scale", "w4a8"])
def test_scales_are_stored_group_major(preset):
    """The kernels read scales as [G, N] rows: QuantLinear keeps them that way (no second GPU copy); W4A8's
    float16 scales and zero points share one [G, N, 2] allocation (weight_format.interleave); progressive
    INT4 (w4a8's own) keeps int8 group scales and zero points apart."""
    from zeroquant.kernels.weight_format import interleaved

    cfg = with_group_size(resolve_config(preset), 32)
    ql = zq.quantize(tiny_model("llama"), cfg, progress=False).model.layers[0].mlp.down_proj
    assert ql.w_scale.shape == (64, 4) and not ql.w_scale.is_contiguous()
    s, z = ql.half().w_scale.t(), ql.w_zero.t()
    assert s.dtype == (torch.int8 if preset == "w4a8" else torch.float16)
    if preset == "w4a8+fp16scale":
        assert interleaved(s, z) and s.stride() == (2 * 64, 2)
    else:
        assert s.is_contiguous() and z.is_contiguous()


def test_version1_checkpoint_is_refused(tmp_path):
    """Version 1 (INT4 in adjacent channel pairs) was never released: it is refused, not repacked."""
    out = zq.save_quantized(zq.quantize(tiny_model("llama"), "w4/8-a16", progress=False), tmp_path / "q")
    manifest = json.loads((out / checkpoint.QUANT_FILE).read_text())
    manifest["version"] = 1
    (out / checkpoint.QUANT_FILE).write_text(json.dumps(manifest))
    with pytest.raises(zq.ZeroQuantError, match="format version 1; this zeroquant reads version 2"):
        zq.load_quantized(out)
