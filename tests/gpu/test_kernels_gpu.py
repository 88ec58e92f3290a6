"""GPU: every Triton kernel against its reference twin on fresh random inputs, over a grid of shapes.

Outputs are allocated from memory poisoned with 0xFF bytes (NaN in fp16/fp32), so an element the kernel
fails to write shows up as NaN or a wrong integer; NaN never passes the checks.
"""

from dataclasses import replace

import pytest
import torch
from kernel_cases import SHAPES, VARIANTS, quant_linear

from zeroquant.kernels import reference as R
from zeroquant.kernels.weight_format import interleave

gemm = pytest.importorskip("zeroquant.kernels.triton.gemm") if torch.cuda.is_available() else None

pytestmark = pytest.mark.gpu

MS = [1, 7, 16, 33, 128, 2048]


def poison_cuda_cache() -> None:
    """Fill freed blocks of the caching allocator (small and large pools) with 0xFF."""
    blocks = [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(255) for _ in range(64)]
    blocks.append(torch.empty(2**28, dtype=torch.uint8, device="cuda").fill_(255))
    del blocks


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output (unwritten or overflowed elements)"
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def assert_quant_close(q, s, q_ref, s_ref):
    assert rel_err(s, s_ref) < 1e-3
    diff = (q.int() - q_ref.int()).abs()
    # Norm/act outputs computed in a different float order may land on the other side of a rounding tie.
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [200, 768, 4096, 11008])
def test_quantize_per_token(m, k):
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
    poison_cuda_cache()
    q, s = rowwise.quantize_per_token(x)
    assert_quant_close(q, s, *R.quantize_per_token(x))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [200, 768, 4096])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_quant(m, k, kind, dtype, residual):
    from zeroquant.kernels.triton import rowwise

    x = (torch.randn(m, k, device="cuda") * 2 + 0.5).to(dtype)
    w = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    b = torch.randn(k, device="cuda").to(dtype) if kind == "layernorm" else None
    r = (torch.randn(m, k, device="cuda") * 3).to(dtype) if residual else None
    poison_cuda_cache()
    y, q, s = rowwise.norm_quant(x, w, b, 1e-5, kind, residual=r)
    y_ref, q_ref, s_ref = R.norm_quant(x, w, b, 1e-5, kind, residual=r)
    assert rel_err(y, y_ref) < 5e-3
    assert_quant_close(q, s, q_ref, s_ref)
    if not residual:
        q2, s2 = rowwise.norm_quant_only(x, w, b, 1e-5, kind)
        assert torch.equal(q2, q) and torch.equal(s2, s)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("gated", [False, True])
def test_act_quant(m, act, gated):
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(m, 3072, device="cuda", dtype=torch.float16) * 2
    g = torch.randn_like(x) if gated else None
    poison_cuda_cache()
    q, s = rowwise.act_quant(x, act, gate=g)
    assert_quant_close(q, s, *R.act_quant(x, act, gate=g))


def test_quantize_per_token_edge_rows():
    """Rows whose every element is the absmax (each divides to exactly +-127), all-zero rows (the scale floor)
    and rows far below it: no clamp is applied in the kernel, so +-127 must come out of the rounding itself."""
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(6, 4096, device="cuda", dtype=torch.float16)
    x[0] = 3.0
    x[1] = -0.007
    x[2, ::2], x[2, 1::2] = 65504.0, -65504.0
    x[3] = 0.0
    x[4] *= 1e-7
    poison_cuda_cache()
    q, s = rowwise.quantize_per_token(x)
    q_ref, s_ref = R.quantize_per_token(x)
    # torch on CUDA divides by a scalar as a multiply by its reciprocal: the scales may differ by an ulp.
    assert torch.equal(q, q_ref) and rel_err(s, s_ref) < 1e-6
    assert q[0].eq(127).all() and q[1].eq(-127).all() and q[3].eq(0).all()


def test_gelu_erf_accuracy():
    """The kernels' GELU (A&S 7.1.26 on the normal CDF) against float64 erf GELU over [-12, 12]."""
    import triton
    import triton.language as tl

    from zeroquant.kernels.triton.rowwise import gelu_erf

    @triton.jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, gelu_erf(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    x = torch.linspace(-12, 12, 1_000_001, device="cuda")
    y = torch.empty_like(x)
    gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.nn.functional.gelu(x.double())
    # |y| * (error in Phi), Phi to ~3e-7 absolute; float32 rounding of 1 - h adds 6e-8.
    assert ((y.double() - want).abs() / x.double().abs().clamp(min=1)).max() < 5e-7


def _run_gemm(ql, x, bits, a8, act=None):
    from zeroquant.kernels.triton import gemm, rowwise

    kw = gemm.KernelWeight.from_quant(ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size)
    if a8:
        q, s = rowwise.quantize_per_token(x)
        args = (q, s, ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size, ql.bias, act)
        poison_cuda_cache()
        return gemm.quant_linear(q, s, kw, ql.bias, act), R.quant_linear(*args)
    poison_cuda_cache()
    return gemm.quant_linear(x, None, kw, ql.bias, act), R.quant_linear(x, None, ql.qweight, ql.w_scale, ql.w_zero,
                                                                        bits, ql.group_size, ql.bias, act)


@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_quant_linear(m, k, n, name, bits, group, sym, a8):
    ql = quant_linear(k, n, bits, group, sym, a8, "cuda").half()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if gemm.KernelWeight.unsupported(k, bits, sym, ql.group_size):
        with pytest.raises(ValueError):
            gemm.KernelWeight.from_quant(ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size)
        return
    got, want = _run_gemm(ql, x, bits, a8)
    assert got.shape == (m, n) and got.dtype == torch.float16
    assert rel_err(got, want) < 2e-3


@pytest.mark.parametrize("m", [1, 16, 300])  # GEMV or small-M INT4, tile GEMM, TMA GEMM (per-channel W8A8)
@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS)
def test_quant_linear_reads_fp16_scales(m, name, bits, group, sym, a8):
    """Every GEMM family reads float16 scales and zero points in place (W4A8's interleaved) and computes what
    the reference does with them (float32 arithmetic after the load)."""
    k, n = 4096, 1000
    ql = quant_linear(k, n, bits, group, sym, a8, "cuda", scale_dtype="float16").half()
    if gemm.KernelWeight.unsupported(k, bits, sym, ql.group_size):
        pytest.skip("format not on the kernels")
    kw = ql.quantized.kernel()
    assert kw.scale.dtype == torch.float16 and kw.scale.data_ptr() == ql.w_scale.data_ptr()
    assert kw.sz_step == (2 if bits == 4 and not sym and a8 else 1)  # W4A8 zero points interleaved with scales
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    got, want = _run_gemm(ql, x, bits, a8)
    assert rel_err(got, want) < 2e-3


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS[:4])
def test_quant_linear_fused_bias_act(act, name, bits, group, sym, a8):
    ql = quant_linear(768, 3072, bits, group, sym, a8, "cuda").half()
    x = torch.randn(2, 64, 768, device="cuda", dtype=torch.float16)
    got, want = _run_gemm(ql, x.reshape(-1, 768), bits, a8, act)
    assert rel_err(got, want) < 2e-3


def _skinny_case(k, n, group, sym, m, dtype, scale_dtype="float16"):
    """A QuantLinear and its input for the small-M INT4 kernel, with the exact result: int8 tokens against the
    reference's exact integer path; fp16/bf16 tokens against exact dequantized weights in float32 (the
    kernel's dot is exact up to float32 accumulation; the reference path rounds the dequantized weight to
    the tokens' dtype first)."""
    a8 = dtype == torch.int8
    ql = quant_linear(k, n, 4, group, sym, a8, "cuda", scale_dtype=scale_dtype).to(torch.float16 if a8 else dtype)
    x = torch.randn(m, k, device="cuda", dtype=ql.bias.dtype)
    if a8:
        q, s = R.quantize_per_token(x)
        return ql, (q, s), R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu")
    w = R.dequantize_weight(ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size)
    return ql, (x, None), R.apply_act(x.float() @ w.t() + ql.bias.float(), "silu")


def _interleaved(kw):
    """kw with its float16 scales and zero points interleaved (as W4A8 linears store them), for any tokens."""
    s, z = interleave(kw.scale, kw.zero)
    out = replace(kw, scale=s, zero=z)
    assert out.sz_step == 2
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("split", [1, 2, 3, 5])
@pytest.mark.parametrize("cfg", range(7))
def test_w4_skinny_every_config_and_split(cfg, split, dtype):
    """Batched-decode INT4 (M <= 16, Hopper), W4A16 and W4A8: each configuration either autotuner may pick
    (64-channel warpgroup programs, 32-channel mma.sync ones) and each split of K (uneven ones too: 1536 / 128
    = 12 steps in 5 slices) against the exact result, and a short last group (576 = 4.5 groups of 128) where
    the configuration's steps divide K; the split-K counters are back to zero afterwards. Scales and zero
    points in float16 (the INT4 presets' default: interleaved, read as one word a row) and float32."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warpgroup MMA needs Hopper")
    from zeroquant.kernels import act_code
    from zeroquant.kernels.triton import skinny_gemm as SK

    configs = [(c, SK.SKINNY_BLOCK_N) for c in SK._SKINNY_CONFIGS]
    configs += [(c, SK.SKINNY_SYNC_BLOCK_N) for c in SK._SKINNY_SYNC_CONFIGS]
    assert len(configs) == 7
    c, rows = configs[cfg]
    tol = {torch.float16: 1e-3, torch.bfloat16: 3e-3, torch.int8: 1e-4}[dtype]
    cases = [(1536, 128, False, 16, "float16"), (1536, 64, True, 5, "float32"), (1536, -1, True, 2, "float16"),
             (1536, -1, False, 3, "float16")]
    cases += [(576, 128, False, 7, "float32")] if 576 % c.kwargs["BLOCK_K"] == 0 else []
    for k, group, sym, m, scale_dtype in cases:
        ql, (x, xs), want = _skinny_case(k, 1000, group, sym, m, dtype, scale_dtype)
        kw = ql.quantized.kernel()
        if scale_dtype == "float16" and not sym:  # one word a row (SZ_WORD), whatever the tokens
            kw = _interleaved(kw)
        poison_cuda_cache()
        got = torch.empty(m, 1000, device="cuda", dtype=ql.bias.dtype)
        tiles = -(-1000 // rows)
        ws = torch.empty(split * tiles * rows * 16, device="cuda")
        counters = SK.split_counters(x.device, tiles)
        SK._w4_skinny_kernel.fn[(tiles, split)](
            x, got if xs is None else xs.reshape(-1), kw.qweight, kw.scale,
            kw.zero if kw.zero is not None else kw.scale, ql.bias, got, ws, counters, m, 1000, k, x.stride(0),
            kw.qweight.stride(0), got.stride(0), A_INT8=xs is not None, HAS_ZERO=kw.zero is not None,
            GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=act_code("silu"),
            SPLIT=split, BLOCK_N=rows, SZ_WORD=kw.sz_step == 2, **c.kwargs, num_warps=c.num_warps,
            num_stages=c.num_stages)
        assert rel_err(got, want) < tol, (group, m)
        assert counters.eq(0).all()


@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_w4_skinny_is_taken_and_repeats_bitwise(dtype, m):
    """quant_linear sends 2..16 bf16 or int8 tokens with INT4 weights to the split-K kernel on Hopper (4096 x
    4096 splits K; up to 8 bf16 tokens on 32-channel mma.sync programs, otherwise 64-channel warpgroup ones),
    and its ordered sum of partials gives the same bits on every launch."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warpgroup MMA needs Hopper")
    from zeroquant.kernels.triton import skinny_gemm as SK

    ql, (x, xs), want = _skinny_case(4096, 4096, 128, False, m, dtype)
    kw = ql.quantized.kernel()
    assert SK.skinny_ok(x, kw) and not SK.skinny_ok(x[:1], kw)
    assert not SK.skinny_ok(x[:1].expand(17, -1), kw)
    rows, per_sm = SK.skinny_tile(x)
    assert rows == (SK.SKINNY_SYNC_BLOCK_N if dtype != torch.int8 and m <= 8 else SK.SKINNY_BLOCK_N)
    assert SK.skinny_split(kw, torch.cuda.get_device_properties(0).multi_processor_count, rows, per_sm) > 1
    first = gemm.quant_linear(x, xs, kw, ql.bias, "silu")
    assert rel_err(first, want) < (1e-4 if xs is not None else 3e-3)
    for _ in range(50):
        assert torch.equal(gemm.quant_linear(x, xs, kw, ql.bias, "silu"), first)
    assert SK.split_counters(x.device, 1).eq(0).all()


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_w4a16_mma_every_format_and_split(split):
    """The Gluon small-M kernel for fp16 tokens against the exact result: group 128 with zero points, group 256
    symmetric, one scale a row with and without zero points, float16 and float32 scales, 3..16 tokens, N = 1000
    (a partial last tile of 128) and K slices that are uneven or empty (1536 = 12 steps in 5 slices of 3); bias
    and SiLU in the epilogue; the split-K counters are back to zero afterwards."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    from zeroquant.kernels.gluon import skinny_mma as SM

    for k, group, sym, m, scale_dtype in [(1536, 128, False, 16, "float16"), (1536, 256, True, 5, "float32"),
                                          (1536, -1, False, 3, "float16"), (1536, -1, True, 8, "float32"),
                                          (1280, 128, False, 7, "float16")]:
        ql, (x, _), want = _skinny_case(k, 1000, group, sym, m, torch.float16, scale_dtype)
        kw = ql.quantized.kernel()
        assert SM.mma_ok(x, kw)
        poison_cuda_cache()
        got = torch.empty(m, 1000, device="cuda", dtype=torch.float16)
        SM.w4a16_mma(x, kw, ql.bias, "silu", got, split=split)
        assert rel_err(got, want) < 1e-3, (k, group, sym, m)
        assert SM.split_counters(x.device, 8).eq(0).all()


@pytest.mark.parametrize("m", [3, 8, 16])
def test_w4a16_mma_is_taken_and_repeats_bitwise(m, monkeypatch):
    """quant_linear sends 3..16 fp16 tokens with INT4 group-128 weights to the Gluon kernel, never to Triton's
    small-M kernel, at its planned split (4096 x 4096 splits K), and the ordered sum of partials gives the same
    bits on every launch."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    from zeroquant.kernels.gluon import skinny_mma as SM

    ql, (x, _), want = _skinny_case(4096, 4096, 128, False, m, torch.float16)
    kw = ql.quantized.kernel()
    assert SM.mma_split(4096, 4096, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    taken = []
    monkeypatch.setattr(gemm, "w4a16_mma", lambda *a, **k: taken.append(1) or SM.w4a16_mma(*a, **k))
    monkeypatch.setattr(gemm, "w4_skinny", lambda *a, **k: pytest.fail("fp16 tokens went to skinny_gemm"))
    first = gemm.quant_linear(x, None, kw, ql.bias, "silu")
    assert taken and rel_err(first, want) < 1e-3
    for _ in range(50):
        assert torch.equal(gemm.quant_linear(x, None, kw, ql.bias, "silu"), first)


def test_w4a16_mma_takes_only_its_formats():
    """bf16 and int8 tokens, one token, 17 tokens, group 64, interleaved scales, K not a multiple of 128 and
    misaligned token rows stay on the other kernels."""
    from zeroquant.kernels.gluon import skinny_mma as SM

    ql, (x, _), _ = _skinny_case(1536, 256, 128, False, 4, torch.float16)
    kw = ql.quantized.kernel()
    assert SM.mma_ok(x, kw)
    assert not SM.mma_ok(x.bfloat16(), kw) and not SM.mma_ok(x[:1], kw)
    assert not SM.mma_ok(x[:1].expand(17, -1).contiguous(), kw)
    assert not SM.mma_ok(x, _interleaved(kw))
    assert not SM.mma_ok(torch.empty(4, 1537, device="cuda", dtype=torch.float16)[:, 1:], kw)
    for k, group in [(1536, 64), (576, 128)]:
        ql, (x, _), _ = _skinny_case(k, 256, group, False, 4, torch.float16)
        assert not SM.mma_ok(x, ql.quantized.kernel())


def test_w4a16_mma_in_a_cuda_graph_with_pdl():
    """Two dependent W4A16 linears at 8 tokens replayed in a CUDA graph (where the kernel waits on the kernel
    before by programmatic dependent launch, after loading its first weights) give the eager results."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    ql1, (x, _), _ = _skinny_case(4096, 4096, 128, False, 8, torch.float16)
    ql2, _, _ = _skinny_case(4096, 4096, 128, False, 8, torch.float16)
    k1, k2 = ql1.quantized.kernel(), ql2.quantized.kernel()

    def step():
        return gemm.quant_linear(gemm.quant_linear(x, None, k1, ql1.bias, "silu"), None, k2, ql2.bias)

    want = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    for _ in range(20):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(got, step())
    assert not torch.equal(got, want)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("unroll", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("split", [1, 3])
def test_w4_gemv(split, dtype, unroll, tokens):
    """One or two tokens, INT4 weights on CUDA cores (W4A16 and W4A8), one or three K slices (uneven: 12 steps, or 9
    in the short-group case), one or two K steps an iteration (where K is a whole number of pairs), against
    the exact result: group 128 with zero points, group 64 symmetric, one scale per row, a short last group
    (576 = 4.5 groups of 128) and N = 1000 (a partial last tile); the split-K counters are back to zero
    afterwards."""
    from zeroquant.kernels import act_code
    from zeroquant.kernels.triton import w4_gemv as W4
    from zeroquant.kernels.triton.gemm_common import split_counters

    tol = {torch.float16: 1e-3, torch.bfloat16: 3e-3, torch.int8: 1e-4}[dtype]
    n = 1000
    for k, group, sym, scale_dtype in [(1536, 128, False, "float16"), (1536, 64, True, "float32"),
                                       (1536, -1, False, "float16"), (576, 128, False, "float32")]:
        ql, (x, xs), want = _skinny_case(k, n, group, sym, tokens, dtype, scale_dtype)
        kw = ql.quantized.kernel()
        if scale_dtype == "float16" and not sym:  # one word a row (SZ_WORD), whatever the tokens
            kw = _interleaved(kw)
        if unroll == 2 and k % (2 * W4._w4_step(k, kw.kernel_group)):
            continue
        poison_cuda_cache()
        got = torch.empty(tokens, n, device="cuda", dtype=ql.bias.dtype)
        counters = split_counters(x.device, n)
        W4._w4_gemv_kernel[(-(-n // W4.W4_BLOCK_N), split)](
            x, got if xs is None else xs.reshape(-1), kw.qweight, kw.scale,
            kw.zero if kw.zero is not None else kw.scale, ql.bias, got,
            torch.empty(tokens * split * 1024, device="cuda"), counters, n, k, kw.qweight.stride(0),
            A_INT8=xs is not None, HAS_ZERO=kw.zero is not None, GROUP_SIZE=kw.kernel_group, HAS_BIAS=True,
            ACT=act_code("silu"), GLU=False, STEP=W4._w4_step(k, kw.kernel_group), SPLIT=split,
            BLOCK_N=W4.W4_BLOCK_N, PDL=False, SZ_WORD=kw.sz_step == 2, UNROLL=unroll, TOKENS=tokens,
            stride_am=x.stride(0), stride_cm=got.stride(0), num_warps=4)
        assert rel_err(got, want) < tol, (k, group)
        assert counters.eq(0).all()


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("unroll", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("split", [1, 3])
def test_w4_gemv_glu(split, dtype, unroll, tokens):
    """The INT4 GEMV (one or two tokens) with a gated MLP's epilogue: gate rows then up rows (2 x 1000: a
    partial last tile), each program reading the gate and up rows of the same outputs, gives silu(gate) * up
    against reference.gated_linear, with one or three K slices and one or two K steps an iteration."""
    from zeroquant.kernels import act_code
    from zeroquant.kernels.triton import w4_gemv as W4
    from zeroquant.kernels.triton.gemm_common import split_counters

    k, n = 1536, 2000
    ql, (x, xs), _ = _skinny_case(k, n, 128, False, tokens, dtype)
    kw = ql.quantized.kernel()
    if xs is None:  # exact dequantized weights (the reference path would round them to bf16 first)
        w = R.dequantize_weight(ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size)
        pre = x.float() @ w.t() + ql.bias.float()
        want = R.apply_act(pre[:, : n // 2], "silu") * pre[:, n // 2:]
    else:
        want = R.gated_linear(x, xs, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu",
                              torch.float32)
    poison_cuda_cache()
    got = torch.empty(tokens, n // 2, device="cuda", dtype=ql.bias.dtype)
    counters = split_counters(x.device, n)
    W4._w4_gemv_kernel[(-(-n // W4.W4_BLOCK_N), split)](
        x, got if xs is None else xs.reshape(-1), kw.qweight, kw.scale, kw.zero, ql.bias, got,
        torch.empty(tokens * split * 2048, device="cuda"), counters, n, k, kw.qweight.stride(0),
        A_INT8=xs is not None, HAS_ZERO=True, GROUP_SIZE=128, HAS_BIAS=True, ACT=act_code("silu"), GLU=True,
        STEP=128, SPLIT=split, BLOCK_N=W4.W4_BLOCK_N, PDL=False, SZ_WORD=kw.sz_step == 2, UNROLL=unroll,
        TOKENS=tokens, stride_am=x.stride(0), stride_cm=got.stride(0), num_warps=4)
    assert rel_err(got, want) < 3e-3
    assert counters.eq(0).all()


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS)
def test_quant_linear_glu(m, name, bits, group, sym, a8):
    """quant_linear(glu=True) in every format: one token (two with INT4 weights) in the GEMV's epilogue, more
    after the GEMM, against
    reference.gated_linear (2 x 1000 rows)."""
    ql = quant_linear(1536, 2000, bits, group, sym, a8, "cuda").half()
    x = torch.randn(m, 1536, device="cuda", dtype=torch.float16)
    xin, xs = R.quantize_per_token(x) if a8 else (x, None)
    want = R.gated_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size, ql.bias, "silu",
                          torch.float16)
    poison_cuda_cache()
    got = gemm.quant_linear(xin, xs, ql.quantized.kernel(), ql.bias, "silu", torch.float16, glu=True)
    assert got.shape == (m, 1000) and rel_err(got, want) < 3e-3


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n", [4096, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_one_or_two_tokens_int4_take_the_gemv_and_repeat_bitwise(dtype, n, m, monkeypatch):
    """quant_linear sends one or two tokens with INT4 weights to the INT4 GEMV, never to the small-M kernel
    (4096 x 4096 splits K), and its ordered sum of partials gives the same bits on every launch; fp16 tokens take
    two K steps an iteration at 4096 x 8192 and at two tokens, elsewhere one."""
    from zeroquant.kernels.triton import w4_gemv as W4
    from zeroquant.kernels.triton.gemm_common import split_counters

    ql, (x, xs), want = _skinny_case(4096, n, 128, False, m, dtype)
    kw = ql.quantized.kernel()
    split, _, unroll = W4._w4_plan(x, n, 4096, 128)
    assert split > 1
    assert (unroll == 2) == (dtype == torch.float16 and (n == 8192 or m == 2))

    def no_skinny(*args, **kwargs):
        raise AssertionError("one or two tokens went to the small-M kernel")

    monkeypatch.setattr(gemm, "w4_skinny", no_skinny)
    first = gemm.quant_linear(x, xs, kw, ql.bias, "silu")
    assert rel_err(first, want) < (1e-4 if xs is not None else 1e-3)
    for _ in range(50):
        assert torch.equal(gemm.quant_linear(x, xs, kw, ql.bias, "silu"), first)
    assert split_counters(x.device, 1).eq(0).all()


def test_two_bf16_tokens_with_int4_weights_take_the_small_m_kernel(monkeypatch):
    """Two bf16 tokens stay on the small-M kernel (the GEMV is slower for them); one goes to the GEMV."""
    from zeroquant.kernels.triton import gemv as GV
    from zeroquant.kernels.triton import skinny_gemm as SK

    ql, (x, _), want = _skinny_case(4096, 4096, 128, False, 2, torch.bfloat16)
    kw = ql.quantized.kernel()
    assert not GV.gemv_ok(x, kw) and GV.gemv_ok(x[:1], kw)
    taken = []
    monkeypatch.setattr(gemm, "w4_skinny", lambda *a, **k: taken.append(1) or SK.w4_skinny(*a, **k))
    got = gemm.quant_linear(x, None, kw, ql.bias, "silu")
    assert taken and rel_err(got, want) < 3e-3


@pytest.mark.parametrize("k, n", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("m", [1, 2])
def test_w4_gemv_plan_fits_one_wave_without_empty_slices(m, k, n, dtype):
    """The INT4 GEMV's launch at Llama-7B decode shapes: every K slice gets work (the last one too), and with
    two K steps an iteration at most W4_PROGRAMS_PER_SM programs an SM (W4_PROGRAMS_PER_SM_2 for two fp16
    tokens)."""
    from zeroquant.kernels.triton import w4_gemv as W4

    x = torch.zeros(m, k, device="cuda", dtype=dtype)
    split, step, unroll = W4._w4_plan(x, n, k, 128)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    iters = k // (step * unroll)
    longest = -(-iters // split)
    assert (split - 1) * longest < iters
    per_sm = W4.W4_PROGRAMS_PER_SM_2 if m == 2 and dtype == torch.float16 else W4.W4_PROGRAMS_PER_SM
    assert unroll == 1 or -(-n // W4.W4_BLOCK_N) * split <= per_sm * sms


@pytest.mark.parametrize("a8", [False, True])
@pytest.mark.parametrize("cfg", range(14))
def test_gemv_every_w8_config(cfg, a8):
    """One token, INT8 weights (per-channel and group 128): each configuration the GEMV's autotuner may pick,
    the token loaded in the weight tile's layout (X_TILE) or once and redistributed, with two K slices,
    against the reference path."""
    from zeroquant.kernels import act_code
    from zeroquant.kernels.triton import gemv as GV

    assert len(GV._GEMV_CONFIGS) == 14
    c = GV._GEMV_CONFIGS[cfg]
    k, n, split = 2048, 1000, 2
    for group in (-1, 128):
        ql = quant_linear(k, n, 8, group, True, a8, "cuda", scale_dtype="float16").half()
        kw = ql.quantized.kernel()
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        xin, xs = R.quantize_per_token(x) if a8 else (x, None)
        want = R.quant_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, 8, ql.group_size, ql.bias, "silu")
        poison_cuda_cache()
        got = torch.empty(1, n, device="cuda", dtype=torch.float16)
        counters = GV.split_counters(x.device, n)
        ch = GV._chunk({"GROUP_SIZE": kw.kernel_group, "BLOCK_K": c.kwargs["BLOCK_K"], "W_BITS": 8})
        GV._gemv_kernel.fn.fn[(-(-n // c.kwargs["BLOCK_N"]), split)](
            xin, xs.reshape(-1) if a8 else got, kw.qweight, kw.scale, ql.bias, got,
            torch.empty(split * n + 64, device="cuda"), counters, n, k, kw.qweight.stride(0), A_INT8=a8,
            GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=act_code("silu"), GLU=False, CH=ch, SPLIT=split,
            PDL=False, **c.kwargs, num_warps=c.num_warps)
        assert rel_err(got, want) < 2e-3, group
        assert counters.eq(0).all()


@pytest.mark.parametrize("a8", [False, True])
@pytest.mark.parametrize("cfg", range(6))
def test_tile_gemm_every_decode_config_masks_rows_past_m(cfg, a8):
    """2..15 tokens on the tile GEMM (M_BUCKET 16): each configuration the autotuner may pick, INT8 (per-channel
    with K not a whole number of BLOCK_K steps, and group 128) and INT4 weights, with rows past M masked (MASK_M)
    and, at 16 tokens, not; rows past M are never written."""
    from zeroquant.kernels import act_code
    from zeroquant.kernels.triton import tile_gemm as TG

    assert len(TG._CONFIGS[16]) == 6
    c = TG._CONFIGS[16][cfg]
    n = 1000
    for bits, group, sym, k in ((8, -1, True, 2048 + 128), (8, 128, True, 2048), (4, 128, False, 2048)):
        ql = quant_linear(k, n, bits, group, sym, a8, "cuda", scale_dtype="float16").half()
        kw = ql.quantized.kernel()
        for m in (2, 5, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xin, xs = R.quantize_per_token(x) if a8 else (x, None)
            want = R.quant_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size, ql.bias, "silu")
            poison_cuda_cache()
            out = torch.full((m + 3, n), float("nan"), device="cuda", dtype=torch.float16)
            got = out[:m]
            grid = (-(-m // c.kwargs["BLOCK_M"]) * -(-n // c.kwargs["BLOCK_N"]),)
            TG._qlinear_kernel.fn[grid](
                xin, xs.reshape(-1) if a8 else got, kw.qweight, kw.scale, kw.zero if kw.zero is not None else kw.scale,
                got, ql.bias, got, m, n, k, xin.stride(0), kw.qweight.stride(0), got.stride(0), 16, A_INT8=a8,
                W_BITS=bits, HAS_ZERO=kw.zero is not None, GROUP_SIZE=kw.kernel_group, HAS_BIAS=True,
                ACT=act_code("silu"), SZ_WORD=kw.sz_step == 2, PROG=False, **c.kwargs, num_warps=c.num_warps,
                num_stages=c.num_stages)
            assert rel_err(got, want) < 2e-3, (bits, group, m)
            assert out[m:].isnan().all()


@pytest.mark.parametrize("k,n", [(1024, 3072), (4096, 1000), (768, 768)])
def test_w8a8_tma_kernel_matches_pointer_kernel(k, n, monkeypatch):
    """Large-M per-channel W8A8 takes the TMA kernel on Hopper; same numbers as the pointer-based kernel
    (and so as the reference, which test_quant_linear checks at M = 2048)."""
    from zeroquant.kernels.triton import rowwise

    ql = quant_linear(k, n, 8, -1, True, True, "cuda").half()
    x = torch.randn(600, k, device="cuda", dtype=torch.float16)
    q, s = rowwise.quantize_per_token(x)
    kw = ql.quantized.kernel()
    assert gemm.tma_ok(q, kw) == (torch.cuda.get_device_capability()[0] >= 9)
    got = gemm.quant_linear(q, s, kw, ql.bias, "gelu")
    monkeypatch.setattr(gemm, "tma_ok", lambda a, w: False)
    want = gemm.quant_linear(q, s, kw, ql.bias, "gelu")
    assert want.abs().max().item() > 0 and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("cfg", range(8))
def test_every_tma_config_matches_pointer_kernel(cfg, monkeypatch):
    """The autotuner may pick any TMA configuration on another GPU: each one (persistent or not, out-of-range
    rows clipped by the TMA store) gives the pointer-based kernel's numbers."""
    from zeroquant.kernels.triton import rowwise
    from zeroquant.kernels.triton import tma_gemm as TM

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    assert len(TM._TMA_CONFIGS) == 8
    ql = quant_linear(1024, 1280, 8, -1, True, True, "cuda").half()
    x = torch.randn(700, 1024, device="cuda", dtype=torch.float16)
    q, s = rowwise.quantize_per_token(x)
    kw = ql.quantized.kernel()
    poison_cuda_cache()
    got = torch.empty(700, 1280, device="cuda", dtype=torch.float16)
    TM.w8a8_tma(q, s.reshape(-1), kw, ql.bias, "relu", got, TM._TMA_CONFIGS[cfg])
    monkeypatch.setattr(gemm, "tma_ok", lambda a, w: False)
    want = gemm.quant_linear(q, s, kw, ql.bias, "relu")
    assert want.abs().max().item() > 0 and rel_err(got, want) < 1e-5


def test_quant_linear_matches_quantlinear_reference_path():
    """The kernel GEMM equals QuantLinear's own integer path (forward_int), not just the twin."""
    ql = quant_linear(4096, 1024, 8, 128, True, True, "cuda").half()
    x = torch.randn(37, 4096, device="cuda", dtype=torch.float16)
    got, _ = _run_gemm(ql, x, 8, True)
    assert rel_err(got, ql._forward_int(x)) < 2e-3


@pytest.mark.parametrize("m, k, n", [(4096, 1024, 3072), (1000, 256, 520), (4096, 4096, 1024)])
def test_w8a8_pingpong_matches_the_tma_gemm_bitwise(m, k, n, monkeypatch):
    """The warp-specialized ping-pong W8A8 GEMM gives the TMA GEMM's bits (same int32 sums, same epilogue order),
    with a partial last row tile (1000 tokens), fewer K steps than ring slots (256) and every program taking
    several tiles; bias and GELU in the epilogue, scales loaded after the main loop or before it. The dispatch
    takes it for fp16 outputs and leaves float32 outputs and fewer than 512 tokens to the TMA GEMM."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    from zeroquant.kernels.gluon import tma_pingpong
    from zeroquant.kernels.triton import rowwise, tma_gemm

    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    a, xs = rowwise.quantize_per_token(x)
    w = gemm.KernelWeight.from_quant(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                                     torch.rand(n, 1, device="cuda") * 1e-2, None, 8, k)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    want = torch.empty(m, n, device="cuda", dtype=torch.float16)
    tma_gemm.w8a8_tma(a, xs.reshape(-1).float(), w, bias, "gelu", want)
    for block, stages, early in [((128, 128, 128), 4, False), ((128, 128, 128), 5, True), ((128, 128, 64), 6, False)]:
        poison_cuda_cache()
        got = torch.empty(m, n, device="cuda", dtype=torch.float16)
        tma_pingpong.w8a8_pingpong(a, xs.reshape(-1).float(), w, bias, "gelu", got, block, stages, early=early)
        assert torch.equal(got, want), (block, stages, early)
    taken = []

    def spy(*args):
        taken.append(args[-1].dtype)
        tma_pingpong.w8a8_pingpong(*args)

    monkeypatch.setattr(gemm, "w8a8_pingpong", spy)
    assert torch.equal(gemm.quant_linear(a, xs, w, bias, "gelu"), want)
    gemm.quant_linear(a, xs, w, bias, "gelu", torch.float32)
    gemm.quant_linear(a[:511], xs[:511], w, bias, "gelu")
    assert taken == [torch.float16]


def test_w8a8_pingpong_bf16_output_matches_the_tma_gemm_bitwise():
    """bf16 models: the ping-pong GEMM writes bf16 with the TMA GEMM's bits, and the dispatch takes it."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    from zeroquant.kernels.triton import rowwise, tma_gemm

    m, k, n = 1000, 1024, 1040
    a, xs = rowwise.quantize_per_token(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w = gemm.KernelWeight.from_quant(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                                     torch.rand(n, 1, device="cuda") * 1e-2, None, 8, k)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    tma_gemm.w8a8_tma(a, xs.reshape(-1).float(), w, bias, "silu", want)
    assert gemm.pingpong_ok(a, want)
    assert torch.equal(gemm.quant_linear(a, xs, w, bias, "silu", torch.bfloat16), want)


@pytest.mark.parametrize("a8", [True, False])
@pytest.mark.parametrize("k,n", [(576, 1536), (4096, 1000), (11008, 4096)])
@pytest.mark.parametrize("m", [1, 7, 64, 65, 128, 1000, 4096])
def test_progressive_int4_tile_gemm(m, k, n, a8):
    """Progressive INT4 (integer group scales, float row scales) on the tile GEMM against its twin: with INT8
    tokens one int32 accumulator for the whole K loop, a short last group (576) too."""
    if k == 11008 and m not in (64, 4096):
        pytest.skip("the Llama-7B down projection at two sizes is enough")
    from zeroquant.kernels.triton import rowwise

    ql = quant_linear(k, n, 4, 128, False, a8, "cuda", scale_dtype="int8").half()
    kw = ql.quantized.kernel()
    assert kw.row_scale is not None and kw.scale.dtype == torch.int8
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if a8:
        q, s = rowwise.quantize_per_token(x)
        want = R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, None,
                              torch.float16, row_scale=ql.w_row_scale)
        poison_cuda_cache()
        got = gemm.quant_linear(q, s, kw, ql.bias, None)
    else:
        want = R.quant_linear(x, None, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, None,
                              torch.float16, row_scale=ql.w_row_scale)
        poison_cuda_cache()
        got = gemm.quant_linear(x, None, kw, ql.bias, None)
    assert got.shape == (m, n) and rel_err(got, want) < 2e-3
