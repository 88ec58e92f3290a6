"""GPU: the GEMMs for more than a few tokens (tile, TMA, ping-pong) and the dispatch of every format, against
the reference twin on fresh random inputs, over a grid of shapes.

Outputs are allocated from memory poisoned with 0xFF bytes (NaN in fp16/fp32), so an element the kernel
fails to write shows up as NaN or a wrong integer; NaN never passes the checks.
"""

import pytest
import torch
from kernel_cases import SHAPES, VARIANTS, poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import reference as R

gemm = pytest.importorskip("zeroquant.kernels.triton.gemm") if torch.cuda.is_available() else None

pytestmark = pytest.mark.gpu

MS = [1, 7, 16, 33, 128, 2048]


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

def test_quant_linear_matches_quantlinear_reference_path():
    """The kernel GEMM equals QuantLinear's own integer path (forward_int), not just the twin."""
    ql = quant_linear(4096, 1024, 8, 128, True, True, "cuda").half()
    x = torch.randn(37, 4096, device="cuda", dtype=torch.float16)
    got, _ = _run_gemm(ql, x, 8, True)
    assert rel_err(got, ql._forward_int(x)) < 2e-3

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
@pytest.mark.parametrize("m", [1, 2, 7, 16, 64, 65, 128, 1000, 4096])
def test_progressive_int4_matches_its_twin(m, k, n, a8):
    """Progressive INT4 (integer group scales, float row scales) against its twin on every kernel the dispatch
    gives it: the GEMV (one or two tokens) and the small-M kernel (up to 16), both with the row scales on their
    sums, w4_gemm (17 and more), and from gemm.UNPACK_TOKENS on the unpacked weight; a short last group (576)."""
    if k == 11008 and m not in (1, 64, 4096):
        pytest.skip("the Llama-7B down projection at three sizes is enough")
    from zeroquant.kernels.triton import rowwise

    ql = quant_linear(k, n, 4, 128, False, a8, "cuda", scale_dtype="int8").half()
    kw = ql.quantized.kernel()
    assert kw.row_scale is not None and kw.scale.dtype == torch.int8
    assert gemm.gemv_ok(torch.empty(m, k, device="cuda", dtype=torch.float16), kw) == (m <= 2 and k % 64 == 0)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    q, s = rowwise.quantize_per_token(x) if a8 else (x, None)
    want = R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, None, torch.float16,
                          row_scale=ql.w_row_scale)
    poison_cuda_cache()
    got = gemm.quant_linear(q, s, kw, ql.bias, None)
    assert got.shape == (m, n) and rel_err(got, want) < 2e-3


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_progressive_int4_glu(m, dtype):
    """Progressive INT4 gated MLP rows: act(gate) * up in the GEMV's epilogue after the row scales (one token,
    two fp16/int8), after the GEMM otherwise, against reference.gated_linear."""
    ql = quant_linear(1536, 2000, 4, 128, False, dtype == torch.int8, "cuda", scale_dtype="int8").half()
    x = torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    xin, xs = R.quantize_per_token(x) if dtype == torch.int8 else (x, None)
    want = R.gated_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu",
                          x.dtype, row_scale=ql.w_row_scale)
    poison_cuda_cache()
    got = gemm.quant_linear(xin, xs, ql.quantized.kernel(), ql.bias, "silu", x.dtype, glu=True)
    # the bf16 twin multiplies bf16-rounded weights (8 mantissa bits), the kernels exact ones
    assert got.shape == (m, 1000) and rel_err(got, want) < (6e-3 if dtype == torch.bfloat16 else 3e-3)
