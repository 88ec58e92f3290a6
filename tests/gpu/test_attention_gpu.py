"""GPU: the attention kernels (encoder, and one-query decode) against their reference twin, inside a quantized
BERT with padding and inside a decoder's greedy decode."""

import pytest
import torch
import transformers as T
from kernel_cases import poison_cuda_cache, rel_err

import zeroquant as zq
from zeroquant.api import set_mode
from zeroquant.kernels import reference as R
from zeroquant.models.encoder_attention import EncoderAttention

pytestmark = pytest.mark.gpu


def _qkv(b, h, sq, sk, d, dtype):
    """q/k/v as Hugging Face makes them: [B, S, H*D] projections viewed per head and transposed."""
    x = torch.randn(b, max(sq, sk), 3, h * d, device="cuda", dtype=dtype)
    q, k, v = (x[:, :n, i].reshape(b, n, h, d).transpose(1, 2) for i, n in enumerate((sq, sk, sk)))
    return q, k, v


def _masks(b, sq, sk, kind, dtype):
    keep = torch.rand(b, sk, device="cuda") > 0.3
    keep[:, 0] = True
    if kind == "none":
        return None
    if kind == "bool-expanded":  # Hugging Face's sdpa mask: stride 0 over heads and queries
        return keep[:, None, None, :].expand(b, 1, sq, sk)
    if kind == "bool-4d":  # any per-query pattern, materialised
        full = torch.rand(b, 1, sq, sk, device="cuda") > 0.5
        full[..., 0] = True
        return full
    return torch.zeros(b, 1, 1, sk, device="cuda", dtype=dtype).masked_fill(~keep[:, None, None, :], -1e4)


@pytest.mark.parametrize("mask", ["none", "bool-expanded", "bool-4d", "additive"])
@pytest.mark.parametrize("b,h,sq,sk,d", [(2, 4, 128, 128, 64), (3, 2, 37, 37, 32), (1, 3, 200, 200, 80),
                                         (2, 2, 64, 300, 128), (4, 16, 1, 9, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_matches_reference(b, h, sq, sk, d, mask, dtype):
    from zeroquant.kernels.triton import attention

    q, k, v = _qkv(b, h, sq, sk, d, dtype)
    m = _masks(b, sq, sk, mask, dtype)
    poison_cuda_cache()
    got = attention.attention(q, k, v, m, d**-0.5)
    want = R.attention(q, k, v, m, d**-0.5)
    assert got.shape == want.shape and got.dtype == dtype
    assert got.transpose(1, 2).is_contiguous()  # [B, S, H, D] in memory: the output projection's layout
    assert rel_err(got, want) < (5e-3 if dtype == torch.float16 else 2e-2)



@pytest.mark.parametrize("b,h,hk,sk", [(1, 32, 32, 192), (2, 8, 2, 1000), (3, 4, 1, 64), (16, 32, 8, 40)])
@pytest.mark.parametrize("mask", ["none", "bool-expanded", "additive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_matches_reference(b, h, hk, sk, mask, dtype):
    """One query per head against a static KV cache [B, HK, Sk, D] with grouped heads (the decode kernel,
    one to several key slices merged by the last program); batch 0's keys all masked (b > 1) gives zeros."""
    from zeroquant.kernels.triton import attention
    from zeroquant.kernels.triton.gemm_common import split_counters

    d = 128
    q = torch.randn(b, 1, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(b, hk, sk, d, device="cuda", dtype=dtype) for _ in range(2))
    m = _masks(b, 1, sk, mask, dtype)
    masked_out = mask == "bool-expanded" and b > 1
    if masked_out:
        m = m.clone()
        m[0] = False
    poison_cuda_cache()
    got = attention.attention(q, k, v, m, d**-0.5)
    want = R.attention(q, k, v, m, d**-0.5)
    assert got.shape == (b, h, 1, d) and got.transpose(1, 2).is_contiguous()
    assert rel_err(got, want) < (5e-3 if dtype == torch.float16 else 2e-2)
    if masked_out:
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert split_counters(q.device, 1).eq(0).all()


def test_decoder_on_kernel_attention_gives_sdpa_logits():
    """A Llama with grouped K/V heads, greedy decode on a static cache: the decode steps' attention on the
    kernel (zeroquant.models.hf_attention) gives SDPA's tokens and logits."""
    from tiny_models import tiny_model

    from zeroquant.kernels.triton.gemm_common import _zeroed_counters
    from zeroquant.models import hf_attention

    # The split-K workspace's first allocation then happens inside the compiled decode's CUDA-graph warm-up,
    # as in a fresh process: a graph pool that kept it fails the warm-up's check for untracked live tensors.
    _zeroed_counters.cache_clear()
    torch.manual_seed(0)
    model = tiny_model("llama").to("cuda", torch.float16).eval()
    ids = torch.randint(0, 1000, (2, 6), device="cuda")
    kwargs = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True, attention_mask=torch.ones_like(ids))
    want = model.generate(ids, **kwargs)
    assert hf_attention.use_kernel_attention(model)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert rel_err(a, b) < 5e-3

def test_attention_fully_masked_rows_are_zero():
    from zeroquant.kernels.triton import attention

    q, k, v = _qkv(2, 2, 16, 16, 64, torch.float16)
    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool, device="cuda")
    keep[1, :, 3] = False
    out = attention.attention(q, k, v, keep, 0.125)
    assert torch.equal(out[1, :, 3], torch.zeros_like(out[1, :, 3]))
    assert rel_err(out, R.attention(q, k, v, keep, 0.125)) < 5e-3


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_bert_with_padding_on_attention_kernel(attn_impl):
    """A quantized BERT batch with padding (the mask as the sdpa or eager implementation builds it): the
    kernel path agrees with the reference path, and padded positions change nothing in the real tokens."""
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=512, attn_implementation=attn_impl)
    q = zq.quantize(T.BertModel(cfg).eval(), "w8a8", progress=False).half().cuda()
    assert sum(isinstance(m, EncoderAttention) for m in q.modules()) == 2
    ids = torch.randint(0, 1000, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        got = q(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        short = q(input_ids=ids[1:2, :25]).last_hidden_state.float()
        set_mode(q, "ref")
        want = q(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    keep = mask.bool()
    assert torch.isfinite(got).all()
    assert rel_err(got[keep], want[keep]) < 1e-2
    assert rel_err(got[1, :25], short[0]) < 1e-2


@pytest.mark.parametrize("preset", ["w8a8", "w4/8-a8", "w4a16"])
def test_bert_qkv_packed_on_first_forward_and_after_a_move(preset):
    """The first CUDA forward packs each layer's q/k/v into one allocation (one GEMM); a device move undoes it
    and the next forward packs again; outputs match the reference path throughout."""
    from zeroquant.nn import packing

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=512)
    q = zq.quantize(T.BertModel(cfg).eval(), preset, progress=False).half().cuda()
    attn = [m for m in q.modules() if isinstance(m, EncoderAttention)]
    lins = lambda a: [getattr(a, n) for n in a.names]
    ids = torch.randint(0, 1000, (2, 33), device="cuda")
    run = lambda: q(input_ids=ids).last_hidden_state.float()
    with torch.no_grad():
        set_mode(q, "ref")
        want = run()
        set_mode(q, "int")
        assert all(packing.packed_buffers(lins(a)) is None for a in attn)
        first = run()
        assert all(packing.packed_buffers(lins(a)) is not None for a in attn)
        q.cpu().cuda()
        assert all(packing.packed_buffers(lins(a)) is None for a in attn)
        again = run()
        assert all(packing.packed_buffers(lins(a)) is not None for a in attn)
    assert rel_err(first, want) < 1e-2 and torch.equal(first, again)
