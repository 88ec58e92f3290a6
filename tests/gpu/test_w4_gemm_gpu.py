"""GPU: the INT4 GEMM for prompts and batches (kernels/triton/w4_gemm.py) against its reference twin, on every
INT4 format it takes, at token counts on both sides of its tiles, with a short last group."""

import pytest
import torch
from kernel_cases import poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import reference as R

pytestmark = pytest.mark.gpu

# (float16 group scales | progressive | per-channel symmetric, tokens int8 | fp16 | bf16)
FORMATS = [("g128", "int8"), ("g128", "fp16"), ("g128", "bf16"), ("progressive", "int8"),
           ("progressive", "fp16"), ("channel", "int8"), ("channel", "fp16")]


@pytest.mark.parametrize("fmt,tokens", FORMATS)
@pytest.mark.parametrize("k,n", [(576, 1536), (4096, 1000), (11008, 4096)])
@pytest.mark.parametrize("m", [17, 64, 65, 128, 1000, 4096])
def test_w4_gemm_matches_its_twin(m, k, n, fmt, tokens):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    if k == 11008 and m not in (64, 4096):
        pytest.skip("the Llama-7B down projection at two sizes is enough")
    from zeroquant.kernels.triton import rowwise
    from zeroquant.kernels.triton.w4_gemm import w4_gemm, w4_gemm_ok

    a8 = tokens == "int8"
    group, sym = (-1, True) if fmt == "channel" else (128, False)
    ql = quant_linear(k, n, 4, group, sym, a8, "cuda", scale_dtype="int8" if fmt == "progressive" else "float16")
    dtype = torch.bfloat16 if tokens == "bf16" else torch.float16
    ql = ql.to(dtype)
    kw = ql.quantized.kernel()
    assert (kw.row_scale is not None) == (fmt == "progressive")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    xin, xs = rowwise.quantize_per_token(x) if a8 else (x, None)
    assert w4_gemm_ok(xin, kw)
    if a8:  # the integer reference: each group's dot is exact in int32 on both sides
        want = R.quant_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu", dtype,
                              row_scale=ql.w_row_scale)
    else:  # the kernel's dot of q - z is exact and scaled in float32: compare with the exact float weights
        want = R.apply_act(x.float() @ ql.quantized.dequantize().t() + ql.bias.float(), "silu")
    poison_cuda_cache()
    got = torch.empty(m, n, device="cuda", dtype=dtype)
    w4_gemm(xin, None if xs is None else xs.reshape(-1).float().contiguous(), kw, ql.bias, "silu", got)
    assert rel_err(got, want) < (3e-3 if dtype == torch.bfloat16 else 1e-3)
