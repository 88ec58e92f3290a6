"""zeroquant bench and zeroquant.tools.runtime on CPU (the CUDA-graph rows are covered by GPU tests)."""

import json

import pytest
import torch
from tiny_models import tiny_input, tiny_model

import zeroquant as zq
from zeroquant.core.config import resolve_config
from zeroquant.tools import benchmark, runtime
from zeroquant.tools.cli import main
from zeroquant.tools.runtime import GreedyDecoder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyllama")
    tiny_model("llama").save_pretrained(d)
    return d


def _greedy_case(arch, preset):
    """A tiny model (quantized by `preset` unless None), a [2, 8] prompt and generate()'s 10 greedy tokens."""
    model = tiny_model(arch)
    if preset:
        model = zq.quantize(model, preset, progress=False)
    ids = tiny_input(2, 8)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)[:, 8:]
    return model, ids, want


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gpt_neox", "gptj"])
@pytest.mark.parametrize("preset", [None, "w4/8-a8"])
def test_static_cache_decoder_matches_generate(arch, preset):
    model, ids, want = _greedy_case(arch, preset)
    dec = GreedyDecoder(model, 2, 20, cuda_graph=False)
    assert torch.equal(dec.generate(ids, 10), want)
    assert torch.equal(dec.generate(ids, 10), want)  # a second prompt starts from a clean cache
    with pytest.raises(ValueError):
        dec.decode(5)  # 18 + 5 > 20


@pytest.mark.parametrize("preset", [None, "w4/8-a8"])
def test_compiled_decoder_matches_generate(preset, monkeypatch):
    """compile=True: the same loop with torch.compile around the forward (aot_eager: no C++ compiler needed
    here), through the kernel path's ops (their CPU twins stand in for the kernels)."""
    from zeroquant import kernels

    model, ids, want = _greedy_case("llama", preset)
    monkeypatch.setattr(kernels, "runs_on", lambda x: True)
    torch._dynamo.reset()
    dec = GreedyDecoder(model, 2, 20, cuda_graph=False, compile=True, backend="aot_eager")
    assert torch.equal(dec.generate(ids, 10), want)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_compiled_prompt_compiles_once_per_bucket(arch):
    """The compiled prompt is padded up to its bucket: prompts of 5 and 11 tokens share the 16-token compile
    (a 20-token prompt needs a second) and each gives the eager loop's tokens."""
    model = tiny_model(arch)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eager = GreedyDecoder(model, 2, 40, cuda_graph=False)
    dec = GreedyDecoder(model, 2, 40, cuda_graph=False, compile=True, backend=counting)
    dec.generate(tiny_input(2, 3), 2)  # the first prompt runs eagerly (it packs fused linears)
    compiles = []
    for length in (5, 11, 20):
        ids = tiny_input(2, length)
        assert torch.equal(dec.generate(ids, 6), eager.generate(ids, 6))
        compiles.append(len(graphs))
    assert compiles[1] == compiles[0] < compiles[2]
    assert runtime.prompt_bucket(5, 40) == runtime.prompt_bucket(16, 40) == 16
    assert runtime.prompt_bucket(17, 40) == 32 and runtime.prompt_bucket(33, 40) == 40


def test_step_bytes_counts_weights_and_filled_cache():
    model = tiny_model("llama")  # untied head: the input embedding table is not read, bar one row a token
    cfg = model.config
    weights = zq.tools.evaluate.weight_bytes(model)  # parameters and buffers (rotary frequencies)
    emb = model.get_input_embeddings().weight
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert benchmark.step_bytes(model, 3, 10.5) == weights - emb.numel() * 4 + 3 * 10.5 * kv
    tied = tiny_model("gpt2")  # GPT-2's head is its embedding table: read whole every step
    assert benchmark.step_bytes(tied, 1, 0) == zq.tools.evaluate.weight_bytes(tied)


def test_bench_cli_tiny_model(llama_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", str(llama_dir), "--device", "cpu", "--batch", "2", "--prompt-len", "12", "--gen-len", "6",
               "--reps", "1", "--preset", "w8a8,w4a16", "--json", str(out), "--md", str(tmp_path / "b.md")])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["fp32 eager", "w8a8 eager", "w4a16 eager"]
    assert all(r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 and not r["note"] for r in rows.values())
    # INT4 weights: the linears shrink 8x, the FP32 embeddings (most of a tiny model) do not
    assert rows["w4a16 eager"]["weights_gib"] < rows["w8a8 eager"]["weights_gib"] < rows["fp32 eager"]["weights_gib"]
    assert rows["w4a16 eager"]["file_gib"] > 0 and rows["fp32 eager"]["file_gib"] is None
    assert "| w4a16 eager |" in capsys.readouterr().out and (tmp_path / "b.md").exists()


def test_bench_random_weights_encoder(capsys):
    rc = main(["bench", "--random-weights", "--config", "bert-large", "--layers", "1", "--device", "cpu",
               "--batch", "1", "--prompt-len", "8", "--reps", "1", "--preset", "w8a8", "--no-save"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "random bert-large (1 layers)" in out and "forward ms" in out and "decode" not in out
    cfg = benchmark.random_config("llama-7b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (4096, 11008, 32, 32000)


def test_bench_extra_fp_compile_mode_rows(tmp_path):
    """--fp-compile-mode adds one FP row per mode after the plain FP rows, before the presets, and 'x best fp'
    divides by the fastest FP row."""
    out = tmp_path / "b.json"
    rc = main(["bench", "--random-weights", "--config", "bert-large", "--layers", "1", "--device", "cpu",
               "--batch", "1", "--prompt-len", "8", "--reps", "1", "--preset", "w8a8", "--no-save",
               "--fp-compile-mode", "default", "--json", str(out), "--md", str(tmp_path / "b.md")])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32 eager", "fp32 compile default", "w8a8 eager"]
    assert all(r["prefill_ms"] > 0 and not r["note"] for r in rows)
    best = min(r["prefill_ms"] for r in rows[:2])
    line = next(x for x in (tmp_path / "b.md").read_text().splitlines() if x.startswith("| w8a8 eager"))
    assert line.split(" | ")[3] == f"{best / rows[2]['prefill_ms']:.2f}"


@pytest.mark.parametrize("argv", [
    ["bench"],  # neither a model nor a config
    ["bench", "--random-weights"],  # no --config
    ["bench", "--config", "llama-7b"],  # no --random-weights
    ["bench", "--random-weights", "--config", "gpt-5"],
    ["bench", "/nonexistent/dir", "--device", "cpu"],
    ["bench", "/nonexistent/dir", "--layers", "2", "--device", "cpu"],  # --layers needs a --config shape
    ["bench", "--random-weights", "--config", "bert-large", "--preset", "w3a3", "--device", "cpu"],
    ["bench", "--random-weights", "--config", "bert-large", "--batch", "0", "--device", "cpu"],
    ["bench", "--random-weights", "--config", "bert-large", "--no-eager", "--device", "cpu"],  # no rows left
])
def test_bench_cli_errors(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("zeroquant: error:")


def test_preset_group_size_suffix():
    ch = resolve_config("w8a8-ch")
    assert ch.name == "w8a8-ch" and ch.attention.weight.group_size == -1 and ch.attention.act.dynamic
    assert resolve_config("w4a16-g64").mlp.weight.group_size == 64
    for bad in ("w8a8-g0", "w8a8-gx", "nope-ch"):
        with pytest.raises(zq.ZeroQuantError):
            resolve_config(bad)


def test_bench_peer_needs_it_installed(llama_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    assert main(["bench", str(llama_dir), "--device", "cpu", "--peer", "torchao"]) == 2
    assert "torchao is not installed" in capsys.readouterr().err
    assert main(["bench", str(llama_dir), "--device", "cpu", "--peer", "bitsandbytes"]) == 2
    assert "unknown --peer 'bitsandbytes'" in capsys.readouterr().err


def test_bench_torchao_rows(llama_dir, tmp_path):
    """torchao's rows come after ours, compiled, on a bfloat16 copy (runs where torchao is installed)."""
    pytest.importorskip("torchao")
    out = tmp_path / "b.json"
    rc = main(["bench", str(llama_dir), "--device", "cpu", "--prompt-len", "8", "--gen-len", "3", "--reps", "1",
               "--preset", "w8a8", "--peer", "torchao", "--no-save", "--json", str(out)])
    assert rc == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows)[-3:] == ["torchao-int8wo compile", "torchao-int4wo compile", "torchao-int8dq compile"]
    assert rows["torchao-int8wo compile"]["decode_tok_s"] > 0 and not rows["torchao-int8wo compile"]["note"]
    # tinygemm is a CUDA kernel: on CPU that row keeps its error and the next row still runs
    assert rows["torchao-int4wo compile"]["note"].startswith("failed") and rows["torchao-int8dq compile"]["prefill_ms"]
