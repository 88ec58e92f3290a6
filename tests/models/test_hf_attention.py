"""zeroquant.models.hf_attention on CPU: which calls reach the attention op, and that they compute what SDPA does."""

import pytest
import torch
from tiny_models import tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import zeroquant as zq
from zeroquant.kernels import ops
from zeroquant.models import hf_attention


@pytest.fixture
def op_calls(monkeypatch):
    """Pretend the kernels run on CPU tensors (the op's CPU implementation is the reference twin) and count
    the calls that reach the attention op."""
    calls = []
    real = ops.attention

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(hf_attention.kernels, "runs_on", lambda x: True)
    monkeypatch.setattr(hf_attention.ops, "attention", counted)
    return calls


def _attn_module() -> torch.nn.Module:
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 2  # what SDPA's function reads to repeat K/V heads
    return module


def _qkv(sq: int, dtype: torch.dtype, sk: int = 9):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, sq, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, sk, 16, generator=g).to(dtype) for _ in range(2))  # two K/V heads for four queries
    return q, k, v


@pytest.mark.parametrize("mask", ["bool", "float", None])
def test_one_query_goes_to_the_op_and_matches_sdpa(op_calls, mask):
    q, k, v = _qkv(1, torch.bfloat16)
    m = None
    if mask == "bool":
        m = torch.arange(9).expand(2, 1, 1, 9) < torch.tensor([5, 9]).view(2, 1, 1, 1)  # a static cache's unfilled tail
    elif mask == "float":
        m = torch.randn(2, 1, 1, 9).to(torch.bfloat16)
    module = _attn_module()
    got, weights = hf_attention.kernel_attention(module, q, k, v, m, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3)
    assert op_calls == [q.shape] and weights is None
    assert got.shape == want.shape == (2, 1, 4, 16)
    assert (got.float() - want.float()).abs().max() < 2e-2 * want.float().abs().max()


@pytest.mark.parametrize("sq,dtype", [(3, torch.bfloat16), (1, torch.float32)])
def test_prompts_and_float32_stay_on_sdpa(op_calls, sq, dtype):
    q, k, v = _qkv(sq, dtype)
    got, _ = hf_attention.kernel_attention(_attn_module(), q, k, v, None)
    assert op_calls == [] and got.shape == (2, sq, 4, 16)


def test_attention_sinks_and_dropout_are_not_taken(op_calls):
    q, k, v = _qkv(1, torch.bfloat16)
    module = _attn_module()
    assert hf_attention._takes(module, q, k, None, 0.0, {})
    assert not hf_attention._takes(module, q, k, None, 0.0, {"s_aux": torch.zeros(4)})
    assert not hf_attention._takes(module.train(), q, k, None, 0.1, {})


def test_fuse_points_decoders_at_the_kernel_attention_only():
    llama = zq.quantize(tiny_model("llama"), "w4a16", progress=False)
    bert = zq.quantize(tiny_model("bert"), "w8a8", progress=False)
    assert llama.config._attn_implementation == hf_attention.ATTENTION
    assert bert.config._attn_implementation == "sdpa"  # encoders have their own attention kernel (fusion)
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not hf_attention.use_kernel_attention(eager) and eager.config._attn_implementation == "eager"


def test_greedy_decode_through_the_op_gives_sdpa_tokens(op_calls):
    torch.manual_seed(0)
    model = tiny_model("llama").to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True)
    want = model.generate(ids, **kwargs)
    assert hf_attention.use_kernel_attention(model)
    got = model.generate(ids, **kwargs)
    assert len(op_calls) == 7 * 2  # every decode step after the prompt, in both layers
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert (a.float() - b.float()).abs().max() < 5e-2 * b.float().abs().max()


def test_one_query_path_traces_without_graph_breaks(op_calls):
    q, k, v = _qkv(1, torch.bfloat16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(hf_attention.kernel_attention)(_attn_module(), q, k, v, mask, scaling=0.25)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graph = explained.graphs[0].code
    assert "zeroquant.attention" in graph and "scaled_dot_product" not in graph
