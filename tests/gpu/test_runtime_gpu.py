"""GPU: CUDA-graph decoding and graphed forwards reproduce eager outputs; fusion hands INT8 over."""

import pytest
import torch
import transformers as T

import zeroquant as zq
from zeroquant.api import set_mode
from zeroquant.nn.fused import FusedNorm, GatedMLP
from zeroquant.nn.handoff import QuantizedActivation
from zeroquant.tools.runtime import GraphedForward, GreedyDecoder

pytestmark = pytest.mark.gpu

DIMS = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4)


def llama(preset):
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=512, num_key_value_heads=2, **DIMS)).eval()
    return (m if preset is None else zq.quantize(m, preset, progress=False)).half().cuda()


@pytest.mark.parametrize("preset", [None, "w8a8", "w4a16", "w4/8-a8"])
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_decoder_matches_generate(preset, batch):
    model = llama(preset)
    ids = torch.randint(0, 1000, (batch, 8), device="cuda")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)[:, 8:]
    dec = GreedyDecoder(model, batch, 48, cuda_graph=True)
    got = dec.generate(ids, 32)
    assert dec.graph is not None
    assert torch.equal(got, want)
    assert torch.equal(dec.generate(ids, 32), want)  # replays after a fresh prefill


def test_graph_decoder_fills_the_cache_to_its_last_entry():
    """A prompt one entry short of max_len, then one decode step: the step's warm-ups before its capture must not
    write past the cache's end."""
    model = llama("w8a8")
    ids = torch.randint(0, 1000, (2, 9), device="cuda")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                              do_sample=False, pad_token_id=0)[:, 9:]
    assert torch.equal(GreedyDecoder(model, 2, 10, cuda_graph=True).generate(ids, 2), want)


# 128 tokens: the tile GEMM; 320: the TMA GEMM; 640: the ping-pong GEMM; PDL in the graph
@pytest.mark.parametrize("seq", [32, 80, 160])
def test_graphed_encoder_matches_eager(seq):
    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(intermediate_size=512, **DIMS)).eval()
    q = zq.quantize(m, "w8a8", progress=False).half().cuda()
    ids = torch.randint(0, 1000, (4, seq), device="cuda")
    with torch.no_grad():
        want = q(input_ids=ids).last_hidden_state.clone()
    g = GraphedForward(q, input_ids=ids)
    ids2 = torch.randint(0, 1000, (4, seq), device="cuda")
    with torch.no_grad():
        want2 = q(input_ids=ids2).last_hidden_state.clone()
    # Under capture Hugging Face builds an explicit attention mask instead of skipping it: same math, another
    # SDPA kernel, so equal up to fp16 rounding rather than bitwise.
    for x, w in ((ids, want), (ids2, want2)):
        got = g(input_ids=x).last_hidden_state.float()
        assert ((got - w.float()).norm() / w.float().norm()).item() < 2e-3


def test_gemms_ask_for_pdl_only_while_a_graph_is_captured():
    from zeroquant.kernels.triton import launch

    x = torch.zeros(1, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9 and launch.gdc_wait is not None
    assert launch.pdl_flags(x, graph_only=True) == {"PDL": False}
    assert launch.pdl_flags(x)["PDL"] == hopper
    seen = []
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        seen.append(launch.pdl_flags(x, graph_only=True))
        x.add_(1)
    assert seen == [{"PDL": True, "launch_pdl": True} if hopper else {"PDL": False}]


def test_fused_norm_quantizes_once_for_its_linears(monkeypatch):
    """Llama w8a8: q/k/v and gate/up take the INT8 from their norm, down_proj from the gated-MLP kernel;
    only o_proj quantizes its own input."""
    q = llama("w8a8")
    assert sum(isinstance(m, FusedNorm) for m in q.modules()) == 4
    from zeroquant.kernels.triton import rowwise  # needs Triton: imported only where the test runs

    calls = []
    real = rowwise.quantize_per_token
    monkeypatch.setattr(rowwise, "quantize_per_token", lambda x: calls.append(x.shape) or real(x))
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    with torch.no_grad():
        got = q(ids).logits.float()
        assert len(calls) == 2  # o_proj, once per block
        set_mode(q, "ref")
        want = q(ids).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("tokens", [(3, 40), (1, 1)])
@pytest.mark.parametrize("preset", ["w8a8", "w4/8-a8", "w4a16"])
def test_gated_mlp_kernel_equals_unfused_kernels(preset, tokens):
    """silu(gate) * up quantized in one kernel (INT8 down), or computed in the epilogue of gate and up packed
    into one GEMM (w4a16; one token: the GEMV), gives what torch's silu and multiply after separate GEMMs
    do, up to the last bit of silu (Triton's sigmoid and torch's round differently at times)."""
    mlp = llama(preset).model.layers[0].mlp
    assert isinstance(mlp, GatedMLP) and mlp.glu == (preset == "w4a16")
    torch.manual_seed(1)
    x = torch.randn(*tokens, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        got = mlp(x)
        want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert want.abs().max().item() > 0
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-3


def test_fused_activation_quantizes_for_the_next_linear(monkeypatch):
    """BERT w8a8: GELU runs in FFN2's quantization kernel, not FFN1's epilogue; outputs match the unfused
    kernels (GELU in the epilogue is computed before the fp16 rounding of FFN1's output, so not bitwise)."""
    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(intermediate_size=512, **DIMS)).eval()
    fused = zq.quantize(m, "w8a8", progress=False).half().cuda()
    plain = zq.quantize(m, "w8a8", progress=False, fuse=False).half().cuda()
    from zeroquant.kernels.triton import rowwise  # needs Triton

    calls = []
    real = rowwise.quantize_per_token
    monkeypatch.setattr(rowwise, "quantize_per_token", lambda x: calls.append(1) or real(x))
    ids = torch.randint(0, 1000, (4, 32), device="cuda")
    with torch.no_grad():
        got = fused(input_ids=ids).last_hidden_state.float()
        assert len(calls) == 2  # each o-proj (block 0's q/k/v take the embedding LayerNorm's INT8 copy)
        want = plain(input_ids=ids).last_hidden_state.float()
    assert ((got - want).norm() / want.norm()).item() < 5e-3


def test_fused_activation_output_goes_only_to_its_linear():
    """FusedAct writes only the INT8 form: its consumer reads that; any other reader raises."""
    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(intermediate_size=512, **DIMS)).eval()
    layer = zq.quantize(m, "w8a8", progress=False).half().cuda().encoder.layer[0]
    x = torch.randn(2, 8, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        handed = layer.intermediate.intermediate_act_fn(x)
        assert isinstance(handed, QuantizedActivation) and handed.value is None  # the float is not written
        got = layer.output.dense(handed)
        want = layer.output.dense(torch.nn.functional.gelu(x.float()).half())
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 5e-3
        with pytest.raises(zq.ZeroQuantError, match="mlp_act"):
            handed + 1


@pytest.mark.parametrize("preset", ["w8a8", "w4/8-a8"])
def test_float32_model_runs_int8_kernels(preset, monkeypatch):
    """A float32 model on CUDA: token-wise INT8 linears still take the kernels (within fp32 rounding of
    the reference), packed where they share a norm and a format."""
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=512, num_key_value_heads=2, **DIMS)).eval()
    q = zq.quantize(m, preset, progress=False).cuda()
    from zeroquant.kernels.triton import gemm  # needs Triton

    calls = []
    real = gemm.quant_linear
    monkeypatch.setattr(gemm, "quant_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    with torch.no_grad():
        got = q(ids).logits
        assert len(calls) == 2 * 4  # per block: q/k/v packed, o, gate/up packed, down
        set_mode(q, "ref")
        want = q(ids).logits
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 1e-3


def test_quantized_weights_on_gpu_are_not_duplicated():
    """The kernels read QuantLinear's buffers in place: building their view allocates nothing."""
    q = llama("w4/8-a8")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    kws = [m.quantized.kernel() for m in zq.quantized_modules(q).values()]
    assert all(kw is not None for kw in kws) and sum(kw.bits == 4 for kw in kws) == 2 * 3  # the MLPs' INT4
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("fmt", ["zeroquant", "compressed-tensors"])
@pytest.mark.parametrize("preset", ["w8a8", "w4/8-a8", "w4a16"])
def test_loaded_checkpoint_runs_on_kernels(tmp_path, preset, fmt):
    """A saved model (either format) loaded back onto the GPU is fused, runs the kernels and decodes as the
    in-memory one."""
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=512, num_key_value_heads=2, **DIMS)).eval()
    q = zq.quantize(m, preset, progress=False).half()
    zq.save_quantized(q, tmp_path / "q", format=fmt)
    loaded = zq.load_quantized(tmp_path / "q", device="cuda")
    q = q.cuda()
    mlp = loaded.model.layers[0].mlp
    assert isinstance(mlp, GatedMLP) and mlp.act == "silu" and mlp.glu == (preset == "w4a16")  # fused again on load
    assert all(m.kernel_format for m in zq.quantized_modules(loaded).values())
    ids = torch.randint(0, 1000, (2, 12), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
        assert torch.equal(loaded.generate(ids, **kw), q.generate(ids, **kw))


ARCHS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=512, num_key_value_heads=2, **DIMS)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(ffn_dim=512, word_embed_proj_dim=256, **DIMS)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=512, **DIMS)),
    "bert": lambda: T.BertModel(T.BertConfig(intermediate_size=512, **DIMS)),
}


@pytest.mark.parametrize("arch,preset", [("llama", "w8a8"), ("llama", "w4a16"), ("llama", "w4/8-a8"), ("opt", "w8a8"),
                                         ("gpt2", "w4/8-a8"), ("gpt_neox", "w8a8"), ("bert", "w8a8")])
def test_fullgraph_compile_on_kernels_matches_eager(arch, preset):
    """torch.compile(fullgraph=True) traces a quantized model on the kernels (custom ops, INT8 copies handed
    over as tensors) with no graph break, and gives the eager model's outputs."""
    torch.manual_seed(0)
    q = zq.quantize(ARCHS[arch]().eval(), preset, progress=False).half().cuda()
    ids = torch.randint(0, 1000, (2, 24), device="cuda")
    out = lambda m: (m(input_ids=ids).last_hidden_state if arch == "bert" else m(input_ids=ids).logits).float()
    with torch.no_grad():
        want = out(q)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(q)(input_ids=ids)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        torch._dynamo.reset()
        got = out(torch.compile(q, fullgraph=True))
    # inductor fuses the float ops between the kernels (keeping float32 where eager rounds to fp16), and one
    # rounding step moved flips a few INT8 codes: the same tolerance as kernels against the reference path.
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("preset", [None, "w8a8", "w4a16", "w4/8-a8"])
def test_compiled_graph_decoder_matches_generate(preset):
    """The compiled loop (torch.compile inside the CUDA graph) gives generate()'s 32 greedy tokens."""
    model = llama(preset)
    ids = torch.randint(0, 1000, (2, 8), device="cuda")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)[:, 8:]
    torch._dynamo.reset()
    dec = GreedyDecoder(model, 2, 48, cuda_graph=True, compile=True)
    assert torch.equal(dec.generate(ids, 32), want)
    assert torch.equal(dec.generate(ids, 32), want)


@pytest.mark.parametrize("preset", [None, "w4/8-a8"])
def test_prompt_graphs_replay_the_compiled_prompt(preset):
    """Each prompt bucket's CUDA graph gives the tokens of the same compiled loop without graphs, for prompts of
    8 and 13 tokens (one bucket, one graph), 8 again, and 20 (a second bucket)."""
    model = llama(preset)
    torch._dynamo.reset()
    graphed = GreedyDecoder(model, 2, 48, cuda_graph=True, compile=True)
    plain = GreedyDecoder(model, 2, 48, cuda_graph=False, compile=True)
    for length, n in ((8, 32), (13, 24), (8, 32), (20, 16)):
        ids = torch.randint(0, 1000, (2, length), device="cuda")
        assert torch.equal(graphed.generate(ids, n), plain.generate(ids, n)), length
    assert sorted(graphed._prompt_graphs) == [16, 32]


def test_compiled_graphed_forward_runs_packed():
    """GraphedForward(compile=True) runs the model eagerly once before compiling, so the compiled forward
    finds the packed weights (a traced forward uses a pack, never makes one) and matches the eager logits."""
    model = llama("w8a8")
    owners = [m for m in model.modules() if isinstance(m, FusedNorm) and m.pack]
    assert owners and all(getattr(m, "packed_buffers", None) is None for m in owners)
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    g = GraphedForward(model, compile=True, input_ids=ids)
    assert all(m.packed_buffers is not None for m in owners)
    got = g(input_ids=ids).logits.float()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-3
