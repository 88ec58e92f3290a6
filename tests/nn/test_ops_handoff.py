"""The kernels as torch custom ops, and the fused ops' INT8 hand-over as a tensor (zeroquant.nn.handoff), on CPU:
each op's CPU implementation is its reference twin, so the kernel path's plumbing (ops, hand-over, compile)
runs here with the Triton kernels swapped for their twins."""

import pytest
import torch
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant import kernels
from zeroquant.core.config import ActQuant, LinearRule, WeightQuant
from zeroquant.kernels import ops
from zeroquant.kernels import reference as R
from zeroquant.models.encoder_attention import EncoderAttention
from zeroquant.nn.fused import FusedNorm, GatedMLP
from zeroquant.nn.handoff import QuantizedActivation
from zeroquant.nn.qlinear import QuantLinear


def _linear(bits=4, gs=32, sym=False):
    torch.manual_seed(0)
    return QuantLinear.from_float(torch.nn.Linear(64, 48), LinearRule(WeightQuant(bits, gs, sym), ActQuant(8)))


def _op_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=g)
    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    ql = _linear()
    q8, s = R.quantize_per_token(x)
    return [
        (ops.quantize_per_token, (x,)),
        (ops.norm_quant, (x, w, b, 1e-5, "layernorm", x.flip(0))),
        (ops.norm_quant, (x, w, None, 1e-6, "rmsnorm", None)),
        (ops.act_quant, (x, "silu", x.flip(1))),
        (ops.quant_linear, (q8, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "gelu",
                            torch.float32)),
        (ops.quant_linear, (x, None, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, None, None, torch.float32)),
        (ops.attention, (x.view(2, 3, 4, 16).transpose(1, 2), x.view(2, 3, 4, 16).transpose(1, 2),
                         x.view(2, 3, 4, 16).transpose(1, 2), torch.rand(2, 1, 3, 3, generator=g) > 0.3, 0.25)),
        (ops.gated_linear, (x, None, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu",
                            torch.float32)),
        (ops.gated_linear, (q8, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, None, "gelu",
                            torch.float16)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_op_schema_fake_and_dispatch(case):
    """torch.library.opcheck: the schema, the fake (meta) implementation's shapes/dtypes/strides and the
    dispatcher registrations agree with what the op returns."""
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_cpu_ops_are_the_reference_twins():
    (_, (x,)), (_, nq), _, (_, aq), (_, ql8), (_, ql16), (_, at), *_ = _op_cases()
    for got, want in [(ops.quantize_per_token(x), R.quantize_per_token(x)), (ops.norm_quant(*nq), R.norm_quant(*nq)),
                      (ops.act_quant(*aq), R.act_quant(*aq))]:
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    q8, s, *w = ql8
    assert torch.equal(ops.quant_linear(*ql8), R.quant_linear(q8.reshape(-1, 64), s.reshape(-1, 1), *w[:5], *w[5:])
                       .reshape(2, 3, 48))
    got = ops.attention(*at)
    assert torch.equal(got, R.attention(*at)) and got.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("case", [7, 8])
def test_gated_linear_is_act_of_the_gate_rows_times_the_up_rows(case):
    """ops.gated_linear on a weight of 2H rows: act(first H outputs) * (last H outputs), from float32 sums."""
    x, xs, qw, ws, wz, bits, gs, bias, act, dtype = _op_cases()[case][1]
    full = ops.quant_linear(x, xs, qw, ws, wz, bits, gs, bias, None, torch.float32)
    want = (R.apply_act(full[..., :24], act) * full[..., 24:]).to(dtype)
    got = ops.gated_linear(x, xs, qw, ws, wz, bits, gs, bias, act, dtype)
    assert got.shape == (2, 3, 24) and got.dtype == dtype and torch.equal(got, want)


def test_quantized_activation_reads_as_its_float_value():
    y = torch.randn(3, 8)
    q, s = R.quantize_per_token(y)
    qa = QuantizedActivation(y, q, s)
    assert qa.int8()[0] is q and qa.int8()[1] is s
    out = qa * 2 + 1  # any other reader sees the float tensor, and gets a plain one
    assert type(out) is torch.Tensor and torch.equal(out, y * 2 + 1)
    assert qa.shape == y.shape and qa.dtype == y.dtype
    qa.add_(1)  # changed in place: the INT8 copy no longer describes it
    assert qa.int8() is None and torch.equal(qa.float_value(), y)


def test_linear_uses_the_handed_copy_only_while_it_is_current(monkeypatch):
    monkeypatch.setattr(kernels, "runs_on", lambda x: True)
    ql = _linear(8, 64, sym=True)
    y = torch.randn(3, 64)
    handed = (torch.zeros(3, 64, dtype=torch.int8), torch.ones(3, 1))
    assert ql.int8_input(QuantizedActivation(y, *handed))[0] is handed[0]
    stale = QuantizedActivation(y, *handed)
    stale.mul_(2)
    assert torch.equal(ql.int8_input(stale)[0], R.quantize_per_token(y)[0])  # quantized afresh, after the change
    assert torch.equal(ql.int8_input(y)[0], R.quantize_per_token(y)[0])


def test_unwritten_float_values_cannot_be_read():
    q, s = R.quantize_per_token(torch.randn(3, 8))
    qa = QuantizedActivation(None, q, s, dtype=torch.float16)
    assert qa.dtype == torch.float16 and qa.shape == q.shape
    with pytest.raises(zq.ZeroQuantError, match="does not match its adapter"):
        qa + 1


# bfloat16 rows: the weight-only GEMM and the encoder attention op take 16-bit inputs only.
CASES = [("llama", "w8a8", torch.float32), ("llama", "w4/8-a8", torch.float32), ("opt", "w4a16", torch.bfloat16),
         ("llama", "w4a16", torch.bfloat16),
         ("bert", "w8a8", torch.bfloat16), ("gpt2", "w4a8-g64", torch.float32), ("gpt_neox", "w8a8", torch.float32)]


@pytest.mark.parametrize("arch,preset,dtype", CASES)
def test_kernel_path_compiles_whole_and_matches(arch, preset, dtype, monkeypatch):
    """The kernel path (fused ops handing INT8 copies to the linears, every GEMM a custom op), run with the
    ops' CPU twins: it gives the reference path's logits, and torch.compile(fullgraph=True) traces it with no
    graph break and gives the same outputs."""
    q = zq.quantize(tiny_model(arch), preset, progress=False).to(dtype)
    ids = tiny_input()
    want = model_output(q, ids)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    monkeypatch.setattr(kernels, "runs_on", lambda x: True)
    handed = []
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.register_forward_pre_hook(lambda m, a: handed.append(
                (isinstance(a[0], QuantizedActivation) and a[0].int8() is not None,
                 isinstance(a[0], QuantizedActivation) and m.packed_slot is not None
                 and a[0].packed_output(m.packed_slot, m.out_features) is not None)))
    eager = model_output(q, ids)
    torch.testing.assert_close(eager, want, rtol=tol, atol=tol)
    assert any(h[0] for h in handed) == (preset != "w4a16")  # every INT8-activation model hands some copy over
    assert any(h[1] for h in handed) == (arch in ("llama", "opt"))  # q/k/v outputs from one packed GEMM
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(input_ids=ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    # one GEMM per linear, less those that a norm or an encoder attention ran as one packed GEMM (packed by the
    # eager calls above: compiling uses that pack); weight-only gated MLPs run gate and up as one GEMM, and for
    # one token as one gated_linear
    glu = sum(isinstance(m, GatedMLP) and m.glu for m in q.modules())
    assert glu == (2 if (arch, preset) == ("llama", "w4a16") else 0)
    gemms = sum(isinstance(m, QuantLinear) for m in q.modules()) - sum(
        len(m.consumers) - 1 for m in q.modules() if isinstance(m, FusedNorm) and m.pack) - 2 * sum(
        isinstance(m, EncoderAttention) for m in q.modules()) - glu

    def traced(inputs):
        torch._dynamo.reset()
        with torch.no_grad():  # at inference, where the fused ops hand over
            graphs = torch._dynamo.explain(q)(input_ids=inputs).graphs
        names = [str(n.target) for g in graphs for n in g.graph.nodes]
        return sum("quant_linear" in t for t in names), sum("gated_linear" in t for t in names)

    assert traced(ids) == (gemms, 0)
    assert traced(ids[:1, :1]) == (gemms - glu, glu)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(model_output(compiled, ids), eager, rtol=1e-5, atol=1e-5)
