import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from zeroquant import ActQuant, LinearRule, QuantLinear, WeightQuant, ZeroQuantError
from zeroquant.core.config import PRESETS
from zeroquant.models.adapters import linear_weight

RULES = {
    "w8a8-g32": LinearRule(WeightQuant(8, 32, True), ActQuant(8)),
    "w4a8-g32-asym": LinearRule(WeightQuant(4, 32, False), ActQuant(8)),
    "w8a8-row": LinearRule(WeightQuant(8, -1, True), ActQuant(8)),
    "w3a8-asym": LinearRule(WeightQuant(3, 16, False), ActQuant(8)),
    "w8a8-static-asym": LinearRule(WeightQuant(8, -1, True, per_tensor=True), ActQuant(8, False, False)),
    "w8a8-static-sym": LinearRule(WeightQuant(8, 64, True), ActQuant(8, False, True)),
    "w8a8-static-asym-w": LinearRule(WeightQuant(8, 32, False), ActQuant(8, False, False)),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(RULES))
def test_integer_path_equals_fake_quant_path(name):
    rule = RULES[name]
    lin = nn.Linear(128, 96)
    x = torch.randn(3, 7, 128) * 2
    rng = (x.min(), x.max())
    ql = QuantLinear.from_float(lin, rule, act_range=rng)
    y_int = ql(x)
    ql.mode = "fake"
    y_fake = ql(x)
    assert y_int.shape == (3, 7, 96)
    assert _rel(y_int, y_fake) < 1e-5
    y_fp = lin(x)
    assert _rel(y_fake, y_fp) < (0.02 if rule.weight.bits == 8 else 0.3)


def test_conv1d_matches_linear():
    lin = nn.Linear(64, 32)
    conv = Conv1D(32, 64)
    conv.weight.data = lin.weight.data.t().clone()
    conv.bias.data = lin.bias.data.clone()
    rule = PRESETS["w8a8"].mlp
    x = torch.randn(5, 64)
    from_conv = QuantLinear.from_weight(linear_weight(conv), conv.bias, rule)
    assert torch.equal(QuantLinear.from_float(lin, rule)(x), from_conv(x))


def test_int4_weights_are_packed():
    ql = QuantLinear.from_float(nn.Linear(64, 16), LinearRule(WeightQuant(4, 32, False)))
    assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (16, 32)
    assert ql.quantized.nbytes() == 16 * 32 + 2 * 16 * 2 * 4


def test_weight_only_error_bound():
    lin = nn.Linear(256, 64)
    ql = QuantLinear.from_float(lin, PRESETS["w8a16"].mlp)
    err = (ql.quantized.dequantize() - lin.weight).abs()
    assert bool((err <= ql.w_scale.repeat_interleave(256 // ql.w_scale.shape[1], 1) / 2 + 1e-7).all())


def test_static_needs_range():
    with pytest.raises(ZeroQuantError, match="calibration"):
        QuantLinear.from_float(nn.Linear(8, 8), PRESETS["w8a8-static"].mlp)


def test_half_precision_io():
    lin = nn.Linear(64, 32)
    ql = QuantLinear.from_float(lin, PRESETS["w8a8"].mlp)
    x = torch.randn(4, 64)
    y16 = ql(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert _rel(y16.float(), ql(x)) < 0.01


def test_half_cast_keeps_scales_float32():
    ql = QuantLinear.from_float(nn.Linear(64, 32), LinearRule(WeightQuant(4, 128, False), ActQuant(8)))
    s = ql.w_scale.clone()
    ql.half()
    assert ql.w_scale.dtype == torch.float32 and torch.equal(ql.w_scale, s)
    assert ql.bias.dtype == torch.float16
