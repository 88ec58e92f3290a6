"""Weight scales and zero points stored in float16 (WeightQuant.scale_dtype, the "+fp16scale" suffix)."""

import pytest
import torch
from safetensors import safe_open
from tiny_models import model_output, tiny_input, tiny_model
from torch import nn

import zeroquant as zq
from zeroquant import QuantLinear, WeightQuant, ZeroQuantError
from zeroquant.algorithms.gptq import gptq_round
from zeroquant.core import quant as Q
from zeroquant.core.config import ActQuant, LinearRule, resolve_config


def _linear(scale_dtype: str, bits: int = 4, group: int = 32, sym: bool = False, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(128, 48)
    return QuantLinear.from_float(lin, LinearRule(WeightQuant(bits, group, sym, scale_dtype=scale_dtype)))


def test_unknown_scale_dtype_is_an_error():
    with pytest.raises(ZeroQuantError, match="scale_dtype must be one of float32, float16"):
        WeightQuant(4, 128, False, scale_dtype="bfloat16")


def test_suffix_sets_every_weight_rule():
    cfg = resolve_config("w4/8-a8+gptq+fp16scale")
    assert cfg.name == "w4/8-a8+gptq+fp16scale"
    assert cfg.attention.weight.scale_dtype == cfg.mlp.weight.scale_dtype == "float16"
    assert cfg.mlp.rounding == "gptq"
    assert resolve_config("w4a16+fp32scale").mlp.weight.scale_dtype == "float32"
    # the presets: INT4 group scales in float16 (progressive against INT8 tokens), INT8 per-row scales in float32
    assert resolve_config("w4a16").mlp.weight.scale_dtype == resolve_config("w4/8-a16").mlp.weight.scale_dtype
    assert resolve_config("w4a16").mlp.weight.scale_dtype == "float16"
    assert resolve_config("w4/8-a8").mlp.weight.scale_dtype == resolve_config("w4a8").attention.weight.scale_dtype
    assert resolve_config("w4/8-a8").mlp.weight.scale_dtype == "int8"
    assert resolve_config("w4/8-a8").attention.weight.scale_dtype == "float32"


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True)])
def test_fp16_buffers_hold_the_scale_the_integers_were_rounded_with(bits, sym):
    """The integers are round-to-nearest against the scale as stored, not the float32 one it came from,
    and the buffers take half the bytes."""
    ql16, ql32 = _linear("float16", bits, sym=sym), _linear("float32", bits, sym=sym)
    assert ql16.w_scale.dtype == torch.float16 and (sym or ql16.w_zero.dtype == torch.float16)
    torch.manual_seed(0)
    w = nn.Linear(128, 48).weight.detach()
    s, z = Q.weight_scale_zero(w, bits, 32, sym, False)
    s16 = s.half().float()
    want = Q.quantize(w, Q.expand_groups(s16, 128, 32), Q.expand_groups(z, 128, 32), bits, sym)
    assert torch.equal(ql16.quantized.ints().to(torch.int16), want.to(torch.int16))
    assert torch.equal(ql16.w_scale.float(), s16)
    saved = ql32.w_scale.numel() * 2 + (0 if sym else ql32.w_zero.numel() * 2)
    assert ql32.quantized.nbytes() - ql16.quantized.nbytes() == saved


def test_all_zero_group_stores_a_normal_fp16_scale():
    lin = nn.Linear(128, 8)
    with torch.no_grad():
        lin.weight[:, :32] = 0.0
    ql = QuantLinear.from_float(lin, LinearRule(WeightQuant(4, 32, False, scale_dtype="float16")))
    assert (ql.w_scale.float() >= torch.finfo(torch.float16).tiny).all()
    w = ql.quantized.dequantize()
    assert torch.isfinite(w).all() and w[:, :32].abs().max() == 0


def test_half_model_keeps_each_scale_dtype():
    """model.half() leaves float32 scales float32 (existing contract) and float16 ones float16."""
    a, b = _linear("float32"), _linear("float16")
    nn.Sequential(a, b).half()
    assert a.w_scale.dtype == torch.float32 and b.w_scale.dtype == torch.float16


@pytest.mark.parametrize("scale_dtype,bits,sym,a8,want", [
    ("float16", 4, False, True, True), ("float16", 4, False, False, False), ("float32", 4, False, True, False),
    ("float16", 4, True, True, False), ("float16", 8, True, True, False)])
def test_w4a8_fp16_scales_are_interleaved_with_zero_points_through_moves(scale_dtype, bits, sym, a8, want):
    """Float16 INT4 scales and zero points of a linear with INT8 tokens share one allocation, a row's pair side
    by side (the small-M kernel reads it as one word), through model.half(), a device move (each buffer copied
    alone, as .to() does) and load_state_dict; the kernel format reads them in place; the state dict holds
    each tensor alone."""
    from zeroquant.kernels.weight_format import interleaved

    def build():
        torch.manual_seed(0)
        rule = LinearRule(WeightQuant(bits, 64, sym, scale_dtype=scale_dtype), ActQuant(8) if a8 else None)
        return QuantLinear.from_float(nn.Linear(128, 48), rule)

    ql = build()
    ref = {k: v.clone() for k, v in ql.state_dict().items()}

    def check():
        s, z = ql.w_scale.t(), None if ql.w_zero is None else ql.w_zero.t()
        assert interleaved(s, z) == want
        kw = ql.quantized.kernel()
        assert kw.scale.data_ptr() == ql.w_scale.data_ptr() and kw.sz_step == (2 if want else 1)
        sd = ql.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ("w_scale", "w_zero") if k in ref)
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())

    check()
    ql.half()
    check()
    ql._apply(lambda t: t.clone(memory_format=torch.contiguous_format))  # what a device move does to each view
    check()
    ql.load_state_dict({k: v.to(ql._buffers[k].dtype) for k, v in ref.items()})
    check()
    x = torch.randn(3, 128)
    assert torch.equal(ql.float()(x), build().half().float()(x))


def test_gptq_scales_are_fp16_values():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    x = torch.randn(256, 128)
    res = gptq_round(w, x.t() @ x, WeightQuant(4, 32, False, scale_dtype="float16"))
    assert torch.equal(res.scale, res.scale.half().float())
    assert not torch.equal(res.scale, gptq_round(w, x.t() @ x, WeightQuant(4, 32, False)).scale)


def test_checkpoint_stores_fp16_scales_and_reloads_identically(tmp_path):
    model = tiny_model("llama")
    q = zq.quantize(model, "w4/8-a8+fp16scale", progress=False)
    out = zq.save_quantized(q, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.w_scale").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.w_zero").dtype == torch.float16
    loaded = zq.load_quantized(out)
    ids = tiny_input()
    assert torch.equal(model_output(q, ids), model_output(loaded, ids))
    assert loaded.zeroquant.config == q.zeroquant.config
    assert loaded.model.layers[0].mlp.down_proj.w_scale.dtype == torch.float16


def test_compressed_tensors_export_writes_float32_scales(tmp_path):
    """compressed-tensors decompresses in the scale's dtype, so the export widens float16 scales (exactly) and
    the import gives the same outputs."""
    q = zq.quantize(tiny_model("llama"), "w4/8-a8-g32+fp16scale", progress=False)
    assert q.model.layers[0].mlp.down_proj.w_scale.dtype == torch.float16
    zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
    back = zq.load_quantized(tmp_path / "ct")
    ids = tiny_input()
    assert torch.equal(model_output(zq.set_mode(back, "ref"), ids), model_output(q, ids))


def test_interleaved_needs_whole_aligned_words():
    """A [G, N] pair counts as interleaved only where each row's scale and zero point form one 4-byte word."""
    from zeroquant.kernels.weight_format import interleave, interleaved

    s, z = interleave(torch.rand(3, 8, dtype=torch.float16), torch.rand(3, 8, dtype=torch.float16))
    assert interleaved(s, z) and interleaved(s[:, 2:], z[:, 2:])
    assert not interleaved(z[:, :-1], s[:, 1:])  # zero then next scale: adjacent, but straddling two words
    assert not interleaved(s.contiguous(), z.contiguous()) and not interleaved(s.float(), z.float())
