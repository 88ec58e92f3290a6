"""CPU: the kernels' reference twins agree with the QuantLinear reference path and with plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import VARIANTS, quant_linear

from zeroquant.core import quant as Q
from zeroquant.kernels import act_code
from zeroquant.kernels import reference as R


@pytest.mark.parametrize("k", [256, 576])  # 576 in groups of 128: a short last group
@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS)
def test_reference_quant_linear_matches_quantlinear(name, bits, group, sym, a8, k):
    ql = quant_linear(k, 96, bits, group if group < 0 or k != 256 else 64, sym, a8, "cpu")
    x = torch.randn(9, k)
    want = ql(x)
    if a8:
        x, s = R.quantize_per_token(x)
    else:
        s = None
    got = R.quant_linear(x, s, ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size, ql.bias, out_dtype=torch.float32)
    assert (got - want).norm() / want.norm() < 1e-6


def test_reference_quant_linear_fuses_activation_and_dtype():
    ql = quant_linear(128, 64, 8, 32, True, True, "cpu")
    x = torch.randn(4, 128)
    q, s = R.quantize_per_token(x)
    got = R.quant_linear(q, s, ql.qweight, ql.w_scale, None, 8, ql.group_size, ql.bias, act="gelu_tanh",
                         out_dtype=torch.float16)
    want = F.gelu(ql(x), approximate="tanh").half()
    assert got.dtype == torch.float16
    assert (got.float() - want.float()).abs().max() < 2e-3


def test_reference_norm_quant_is_norm_then_token_quant():
    x = torch.randn(6, 80)
    w, b = torch.randn(80), torch.randn(80)
    y, q, s = R.norm_quant(x, w, b, 1e-5, "layernorm")
    assert torch.equal(y, F.layer_norm(x, (80,), w, b, 1e-5))
    q2, s2 = Q.quantize_per_token(y)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    y, _, _ = R.norm_quant(x, w, None, 1e-6, "rmsnorm")
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert (y - rms).abs().max() < 1e-5


def test_reference_norm_quant_adds_the_residual_first():
    x, r, w, b = torch.randn(3, 64).half(), torch.randn(3, 64).half(), torch.rand(64).half(), torch.randn(64).half()
    for got, want in zip(R.norm_quant(x, w, b, 1e-5, residual=r), R.norm_quant(x + r, w, b, 1e-5), strict=True):
        assert torch.equal(got, want)


def test_reference_act_quant_gated():
    x, g = torch.randn(3, 64), torch.randn(3, 64)
    q, s = R.act_quant(x, "silu", gate=g)
    q2, s2 = Q.quantize_per_token(F.silu(x) * g)
    assert torch.equal(q, q2) and torch.allclose(s, s2)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        act_code("swish2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "gelu_tanh", None])
def test_activation_in_place_rounds_as_the_float32_one(act, dtype):
    y = (torch.randn(33, 300) * 4).to(dtype)
    want = R.apply_act(y.float(), act).to(dtype)
    got = y.clone()
    assert R.apply_act_(got, act) is got or act is None
    if act == "gelu_tanh":  # the vectorised float32 tanh differs in the far negative tail: -1.8e-7 for -0.0
        assert (got.float() - want.float()).abs().max() < 1e-6
    else:
        assert torch.equal(got, want)
    assert act is None or not torch.equal(got, y)


@pytest.mark.parametrize("masked", ["none", "bool", "additive"])
def test_reference_attention_matches_sdpa(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (5, 7, 7))
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., 4:] = False
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(2, 1, 1, 7).masked_fill(~keep, torch.finfo(torch.float32).min)}[masked]
    got = R.attention(q, k, v, mask, 0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert (got - want).abs().max() < 1e-5


def test_reference_attention_fully_masked_row_is_zero():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 2, :] = False  # query 2 may attend to nothing
    out = R.attention(q, k, v, keep, 0.5)
    assert torch.equal(out[:, :, 2], torch.zeros(1, 2, 8)) and torch.isfinite(out).all()


def test_small_m_mma_channel_relabelling_keeps_the_dot():
    """The Gluon small-M kernel's K relabelling (weight_format.MMA_A_ORDER / MMA_B_ORDER): a 128-channel step's
    nibbles in the order its unpack leaves them and the tokens in stored order, each permuted to the operand's
    columns, give the dot in stored order; a wrong order (the two swapped) does not."""
    from zeroquant.kernels.weight_format import MMA_A_ORDER, MMA_B_ORDER

    torch.manual_seed(0)
    rows, tokens = 16, 5
    q = torch.randint(0, 16, (rows, 128), dtype=torch.int16)
    x = torch.randn(tokens, 128, dtype=torch.float64)
    packed = Q.pack_int4(q, symmetric=False).to(torch.int16).view(rows, 16, 2, 2)  # [rows, word, p, q] bytes
    nib = torch.stack((packed & 15, packed >> 4), -1).transpose(2, 3)  # [rows, word, q, p, h]

    def operands(a_order, b_order):
        a = nib.reshape(rows, *[2] * 7).permute(a_order).reshape(rows, 128).double()
        return a, x.reshape(tokens, *[2] * 7).permute(b_order).reshape(128, tokens)

    a, b = operands(MMA_A_ORDER, MMA_B_ORDER)
    assert torch.allclose(a @ b, q.double() @ x.t())
    a, b = operands(MMA_B_ORDER, MMA_A_ORDER)
    assert not torch.allclose(a @ b, q.double() @ x.t())
