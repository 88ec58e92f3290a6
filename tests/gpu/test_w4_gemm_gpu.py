"""GPU: the INT4 GEMM for prompts and batches (kernels/triton/w4_gemm.py) against its reference twin: every
configuration its autotuner may pick on every INT4 format it takes, at token counts on both sides of its tiles,
with a short last group; then the autotuned entry point."""

import pytest
import torch
from kernel_cases import poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import act_code
from zeroquant.kernels import reference as R

pytestmark = pytest.mark.gpu

# (float16 group scales | progressive | per-channel symmetric, tokens int8 | fp16 | bf16)
FORMATS = [("g128", "int8"), ("g128", "fp16"), ("g128", "bf16"), ("progressive", "int8"),
           ("progressive", "fp16"), ("channel", "int8"), ("channel", "fp16")]


def _case(m, k, n, fmt, tokens):
    """A QuantLinear, its kernel weight and tokens, and the exact result: int8 tokens against the integer
    reference (each group's dot is exact in int32 on both sides); fp16/bf16 ones against the exact float weights
    (the kernel's dot of q - z is exact and scaled in float32)."""
    from zeroquant.kernels.triton import rowwise

    a8 = tokens == "int8"
    group, sym = (-1, True) if fmt == "channel" else (128, False)
    ql = quant_linear(k, n, 4, group, sym, a8, "cuda", scale_dtype="int8" if fmt == "progressive" else "float16")
    dtype = torch.bfloat16 if tokens == "bf16" else torch.float16
    ql = ql.to(dtype)
    kw = ql.quantized.kernel()
    assert (kw.row_scale is not None) == (fmt == "progressive")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    if a8:
        q, s = rowwise.quantize_per_token(x)
        want = R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu", dtype,
                              row_scale=ql.w_row_scale)
        return ql, kw, q, s.reshape(-1).float().contiguous(), want
    want = R.apply_act(x.float() @ ql.quantized.dequantize().t() + ql.bias.float(), "silu")
    return ql, kw, x, None, want


def _tol(tokens):
    return 3e-3 if tokens == "bf16" else 1e-3


def _skip_without_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")


@pytest.mark.parametrize("fmt,tokens", FORMATS)
@pytest.mark.parametrize("cfg", range(22))
def test_w4_gemm_every_config_matches_its_twin(cfg, fmt, tokens):
    """Each configuration at 64, 65, 128, 1000 and 4096 tokens (split over K: 17, 64, 65, 128 and 256) on 1000
    output channels (a partial tile), K 576 (a short last group) where BLOCK_K is 64, else 1024; the 256-row tiles
    for every format but W4A8 with float16 group scales, and an accumulator per nibble plane for 16-bit tokens
    only, as the autotuner prunes."""
    _skip_without_hopper()
    from zeroquant.kernels.triton import w4_gemm as W

    configs = W._EVERY_CONFIG
    assert len(configs) == 22
    c = configs[cfg]
    if (c in W._ONE_ACC_CONFIGS and tokens == "int8" and fmt == "g128") or (c.kwargs["SPLIT"] and tokens == "int8"):
        pytest.skip("pruned for this format")
    k, n = (576 if c.kwargs["BLOCK_K"] == 64 else 1024), 1000
    for m in (17, 64, 65, 128, 256) if c.kwargs["SPLIT_K"] > 1 else (64, 65, 128, 1000, 4096):
        ql, kw, x, xs, want = _case(m, k, n, fmt, tokens)
        poison_cuda_cache()
        got = torch.empty(m, n, device="cuda", dtype=x.dtype if xs is None else torch.float16)
        grid = (-(-m // c.kwargs["BLOCK_T"]) * -(-n // c.kwargs["BLOCK_N"]), c.kwargs["SPLIT_K"])
        ws, counters = W.split_workspace(m, n, x.device)
        W._w4_gemm_kernel.fn[grid](
            x, got if xs is None else xs, kw.qweight, kw.scale, kw.zero if kw.zero is not None else kw.scale,
            kw.row_scale if kw.row_scale is not None else got, ql.bias, got, m, n, k, x.stride(0),
            kw.qweight.stride(0), got.stride(0), W._m_bucket(m), A_INT8=xs is not None, HAS_ZERO=kw.zero is not None,
            GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=act_code("silu"), SZ_WORD=kw.sz_step == 2,
            PROG=kw.row_scale is not None, ws_ptr=ws, cnt_ptr=counters, **c.kwargs, num_warps=c.num_warps,
            num_stages=c.num_stages)
        assert rel_err(got, want) < _tol(tokens), m


@pytest.mark.parametrize("fmt,tokens", FORMATS)
@pytest.mark.parametrize("m,k,n", [(17, 4096, 1000), (4096, 4096, 1000), (64, 11008, 4096), (200, 4096, 11008)])
def test_w4_gemm_autotuned_matches_its_twin(m, k, n, fmt, tokens):
    """The launcher (autotuned configuration) at the fewest tokens it takes, a prompt's worth, and the Llama-7B
    down projection."""
    _skip_without_hopper()
    from zeroquant.kernels.triton.w4_gemm import w4_gemm, w4_gemm_ok

    ql, kw, x, xs, want = _case(m, k, n, fmt, tokens)
    assert w4_gemm_ok(x, kw) and not w4_gemm_ok(x[:16], kw)
    poison_cuda_cache()
    got = torch.empty(m, n, device="cuda", dtype=x.dtype if xs is None else torch.float16)
    w4_gemm(x, xs, kw, ql.bias, "silu", got)
    assert rel_err(got, want) < _tol(tokens)
