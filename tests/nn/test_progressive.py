"""Progressive INT4 ("+int8scale"): integer group scales s2 times a float row scale s1, every path."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import model_output, tiny_input, tiny_model
from torch import nn

import zeroquant as zq
from zeroquant import QuantLinear, WeightQuant, ZeroQuantError
from zeroquant.core import quant as Q
from zeroquant.core.config import ActQuant, LinearRule, resolve_config


def _linear(act: bool = True, k: int = 192, group: int = 64) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(k, 48)
    rule = LinearRule(WeightQuant(4, group, False, scale_dtype="int8"), ActQuant(8) if act else None)
    return lin, QuantLinear.from_float(lin, rule)


def test_suffix_applies_to_int4_rules_only():
    cfg = resolve_config("w4/8-a8+int8scale")
    assert cfg.name == "w4/8-a8+int8scale" and cfg.mlp.weight.progressive
    assert cfg.attention.weight == resolve_config("w4/8-a8").attention.weight  # INT8 attention unchanged
    with pytest.raises(ZeroQuantError, match="needs 4-bit asymmetric group-wise"):
        resolve_config("w8a8+int8scale")
    with pytest.raises(ZeroQuantError, match="4-bit asymmetric group-wise"):
        WeightQuant(4, 128, True, scale_dtype="int8")


def test_buffers_hold_integer_scales_and_an_exact_row_scale():
    lin, ql = _linear()
    s_eff, z, s1, s2 = Q.progressive_scale_zero(lin.weight.detach(), 64)
    assert ql.w_scale.dtype == torch.int8 and torch.equal(ql.w_scale.float(), s2)
    assert torch.equal(ql.w_row_scale, s1) and torch.equal(ql.w_zero.float(), z)
    q = Q.quantize(lin.weight.detach(), Q.expand_groups(s_eff, 192, 64), Q.expand_groups(z, 192, 64), 4, False)
    assert torch.equal(ql.quantized.ints().to(torch.int16), q.to(torch.int16))
    assert torch.equal(ql.quantized.dequantize(), Q.dequantize_weight(q, s_eff, z, 64))


def test_integer_path_is_an_int8_gemm_with_one_scale_per_row():
    """What a progressive W4A8 kernel computes: int8 tokens times the INT8 weight s2 * (q - z), summed over the
    whole row in integers, then token scale times row scale."""
    lin, ql = _linear()
    x = torch.randn(5, 192)
    w8, offset, scale, group = ql.quantized.int8()
    assert w8.dtype == torch.int8 and offset is None and group == 192 and torch.equal(scale, ql.w_row_scale)
    x8, sx = Q.quantize_per_token(x)
    want = (x8.int() @ w8.int().t()).float() * ql.w_row_scale.t() * sx + lin.bias.detach()
    got = ql(x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    fake = zq.set_mode(nn.Sequential(ql), "fake")(x)
    assert torch.allclose(got, fake, rtol=1e-4, atol=1e-4)


def test_scales_that_are_not_row_multiples_are_refused():
    lin, ql = _linear(act=False)
    s, z = Q.weight_scale_zero(lin.weight.detach(), 4, 64, False)  # float group scales
    q = Q.quantize(lin.weight.detach(), Q.expand_groups(s, 192, 64), Q.expand_groups(z, 192, 64), 4, False)
    with pytest.raises(ZeroQuantError, match="whole multiples"):
        ql.set_int_weight(q, s, z)


def test_rtn_gptq_and_lkd_save_load_and_export(tmp_path):
    """RTN, GPTQ and GPTQ + LKD (which learns its clipping in whole row-scale steps) all give progressive
    layers; the checkpoint reloads to the same outputs; compressed-tensors gets s1 * s2 as float32 scales."""
    model = tiny_model("opt")
    calib = tiny_input(8, 32, seed=3)
    ids = tiny_input(2, 32, seed=9)
    ref = model_output(model, ids)
    errs = {}
    lkd = zq.LKDConfig(steps=60, holdout=0.0, device="cpu")
    for name, kw in [("rtn", {}), ("gptq", {"calib_data": calib}), ("lkd", {"calib_data": calib, "lkd": lkd})]:
        preset = "w4/8-a8-g32+int8scale" + ("+gptq" if name != "rtn" else "")
        q = zq.quantize(model, preset, progress=False, **kw)
        mods = [m for m in zq.quantized_modules(q).values() if m.wq.progressive]
        assert mods and all(1 <= m.w_scale.min() and m.w_scale.max() <= 16 for m in mods)
        errs[name] = ((model_output(q, ids) - ref) ** 2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs
    assert all(r["mse_after"] <= r["mse_before"] for r in q.zeroquant.lkd)
    assert any(r["mse_after"] < r["mse_before"] for r in q.zeroquant.lkd)
    out = zq.save_quantized(q, tmp_path / "q")
    loaded = zq.load_quantized(out)
    assert loaded.zeroquant.config == q.zeroquant.config
    assert torch.equal(model_output(loaded, ids), model_output(q, ids))
    zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    back = zq.load_quantized(tmp_path / "ct")
    assert torch.allclose(model_output(zq.set_mode(back, "ref"), ids), model_output(q, ids), atol=1e-5)


def test_checkpoint_whose_int8_weights_would_overflow_is_refused(tmp_path):
    q = zq.quantize(tiny_model("llama"), "w4a16-g32+int8scale", progress=False)
    out = zq.save_quantized(q, tmp_path / "q")
    file = out / "model.safetensors"
    t = load_file(str(file))
    name = "model.layers.0.mlp.down_proj"
    t[f"{name}.w_scale"][0, 0] = 16
    t[f"{name}.w_zero"][0, 0] = 0  # levels 0..240
    save_file(t, str(file), metadata={"format": "pt"})
    with pytest.raises(ZeroQuantError, match="would overflow"):
        zq.load_quantized(out)


@pytest.mark.parametrize("act", [True, False])
def test_kernel_twin_matches_the_layer(act):
    """The kernels' reference twin on progressive storage (integer group scales, row scales) gives the layer's
    own output: the integer path with INT8 tokens, the dequantized weight with 16-bit ones."""
    from zeroquant.kernels import reference as R

    _, ql = _linear(act=act, k=576, group=128)  # a short last group too
    x = torch.randn(9, 576)
    kw = ql.quantized.kernel()
    assert kw.scale.dtype == torch.int8 and kw.row_scale.shape == (48,)
    if act:
        x8, sx = Q.quantize_per_token(x)
        got = R.quant_linear(x8, sx, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, None,
                             torch.float32, row_scale=ql.w_row_scale)
        assert torch.equal(got, ql(x))
    else:
        got = R.quant_linear(x, None, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, None,
                             torch.float32, row_scale=ql.w_row_scale)
        assert torch.allclose(got, ql(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [True, False])
def test_kernel_ops_carry_the_row_scales_alone_and_packed(act, monkeypatch):
    """The kernel ops take progressive weights (their row scales travel as row_scale): run through the ops (their
    CPU twins here) a linear gives its integer path's output, and linears packed into one GEMM, or a gated pair
    into one gated op, give each one's own."""
    from zeroquant import kernels
    from zeroquant.kernels import ops
    from zeroquant.kernels import reference as R
    from zeroquant.nn import packing
    from zeroquant.nn.fused import packed_linears

    torch.manual_seed(0)
    rule = LinearRule(WeightQuant(4, 64, False, scale_dtype="int8"), ActQuant(8) if act else None)
    linears = [QuantLinear.from_float(nn.Linear(192, n), rule) for n in (48, 32, 48)]
    x = torch.randn(5, 192)
    want = [m(x) for m in linears]  # the integer reference path
    monkeypatch.setattr(kernels, "runs_on", lambda t: True)
    assert all(m.kernel_format for m in linears)
    assert all(torch.allclose(m(x), w, rtol=1e-5, atol=1e-5) for m, w in zip(linears, want, strict=True))
    packing.pack(linears)
    packed = packing.packed_buffers(linears)
    assert packed["w_row_scale"].shape == (128, 1)
    for got, w in zip(packed_linears(packed, linears, x), want, strict=True):
        assert torch.allclose(got, w, rtol=1e-5, atol=1e-5)
    gate, up = linears[0], linears[2]
    q8, s = Q.quantize_per_token(x) if act else (x, None)
    both = packing.packed_buffers([gate, up]) or {}
    assert not both  # gate and up are not neighbours in the pack: ask the op directly
    w8 = torch.cat([gate.qweight, up.qweight])
    glu = ops.gated_linear(q8, s, w8, torch.cat([gate.w_scale, up.w_scale]), torch.cat([gate.w_zero, up.w_zero]),
                           4, 64, torch.cat([gate.bias, up.bias]), "silu", torch.float32,
                           row_scale=torch.cat([gate.w_row_scale, up.w_row_scale]))
    assert torch.allclose(glu, R.glu(torch.cat(want[::2], -1), "silu", torch.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [64, 128])
def test_unpacked_int8_weight_times_its_row_scale_is_the_float_weight(group):
    """What the unpack-first GEMM path runs on: the INT8 weight s2 * (q - z) with the row scale per channel is the
    layer's float weight exactly (s1 * s2 is exact in float32), and fits int8 unclipped."""
    from zeroquant.kernels import reference as R

    torch.manual_seed(0)
    m = QuantLinear.from_float(nn.Linear(320, 48), LinearRule(WeightQuant(4, group, False, scale_dtype="int8")))
    w8 = R.unpacked_weight(m.qweight, m.w_scale, m.w_zero, m.group_size, torch.int8)
    exact = R.int_weight(m.qweight, m.w_zero, 4, m.group_size) * Q.expand_groups(m.w_scale.double(), 320, m.group_size)
    assert torch.equal(w8.double(), exact)
    w32 = R.unpacked_weight(m.qweight, m.w_scale, m.w_zero, m.group_size, torch.float32, m.w_row_scale)
    assert torch.equal(w8.float() * m.w_row_scale.float(), w32)
    assert torch.equal(w32, m.quantized.dequantize().float())
