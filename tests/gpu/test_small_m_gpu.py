"""GPU: the decode kernels (one-token GEMVs, the small-M INT4 kernels in Triton and Gluon) against their
reference twins, every configuration and K split, and which of them the dispatch takes.

Outputs are allocated from memory poisoned with 0xFF bytes (NaN in fp16/fp32), so an element the kernel
fails to write shows up as NaN or a wrong integer; NaN never passes the checks.
"""

from dataclasses import replace

import pytest
import torch
from kernel_cases import poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import reference as R
from zeroquant.kernels.weight_format import interleave

gemm = pytest.importorskip("zeroquant.kernels.triton.gemm") if torch.cuda.is_available() else None

pytestmark = pytest.mark.gpu


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
