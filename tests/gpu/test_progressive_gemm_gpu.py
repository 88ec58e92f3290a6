"""GPU: the Gluon W4A8 GEMM for progressive INT4 weights (kernels/gluon/progressive_gemm.py) against its reference
twin, at token counts on both sides of its tiles, with a short last group, for each tile shape it offers."""

import pytest
import torch
from kernel_cases import poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import reference as R

pytestmark = pytest.mark.gpu

# (weight rows, tokens) a program, ring depth, warps
TILES = [((128, 128), 4, 8), ((128, 64), 4, 4), ((256, 64), 4, 8)]


def _check(m, k, n, tile, fused: bool):
    """The kernel against its twin on fresh tokens; fused: with a bias and SiLU, else neither."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("Hopper kernel")
    from zeroquant.kernels.gluon.progressive_gemm import progressive_gemm, progressive_gemm_ok
    from zeroquant.kernels.triton import rowwise

    ql = quant_linear(k, n, 4, 128, False, True, "cuda", scale_dtype="int8").half()
    kw = ql.quantized.kernel()
    bias, act = (ql.bias, "silu") if fused else (None, None)
    q, s = rowwise.quantize_per_token(torch.randn(m, k, device="cuda", dtype=torch.float16))
    assert progressive_gemm_ok(q, kw) and not progressive_gemm_ok(q[:16], kw)
    want = R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, bias, act, torch.float16,
                          row_scale=ql.w_row_scale)
    poison_cuda_cache()
    got = torch.empty(m, n, device="cuda", dtype=torch.float16)
    block, stages, warps = tile
    progressive_gemm(q, s.reshape(-1).float().contiguous(), kw, bias, act, got, block, stages, warps)
    assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0][0]}x{t[0][1]}")
@pytest.mark.parametrize("k,n", [(576, 1536), (4096, 1000), (11008, 4096)])
@pytest.mark.parametrize("m", [17, 64, 65, 128, 1000, 4096])
def test_progressive_gemm_matches_its_twin(m, k, n, tile):
    if k == 11008 and m not in (64, 4096):
        pytest.skip("the Llama-7B down projection at two sizes is enough")
    _check(m, k, n, tile, fused=True)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0][0]}x{t[0][1]}")
def test_progressive_gemm_without_bias_or_activation(tile):
    """No bias and no activation (the kernel table's call): a separate compile, which once failed to lower."""
    _check(65, 4096, 1000, tile, fused=False)
