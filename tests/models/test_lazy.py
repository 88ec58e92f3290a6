"""Quantizing from a checkpoint's shards one block at a time (zeroquant.models.lazy) gives what quantizing the
model in memory gives."""

import pytest
import torch
from tiny_models import tiny_input, tiny_model

import zeroquant as zq
from zeroquant.models.lazy import has_safetensors, open_lazy


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(out, max_shard_size="100KB")  # several shards and an index
    return out


@pytest.mark.parametrize("preset,lkd", [("w4/8-a8", None), ("w8a8+smooth", None), ("w8a8-static", None),
                                        ("w4/8-a8+gptq", None), ("w4/8-a8", zq.LKDConfig(steps=3))])
def test_lazy_equals_in_memory(shards, preset, lkd):
    calib = tiny_input(4, 16, seed=5)
    fp, _ = zq.load_fp_model(shards, tokenizer=False)
    want = zq.quantize(fp, preset, calib_data=calib, lkd=lkd, progress=False)
    model, _, blocks = open_lazy(shards, tokenizer=False)
    assert all(p.is_meta for p in blocks.blocks.parameters())
    got = zq.quantize(model, preset, calib_data=calib, lkd=lkd, inplace=True, blocks=blocks, progress=False)
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_meta for p in got.parameters())
    ids = tiny_input(2, 8, seed=9)
    assert torch.equal(want(ids).logits, got(ids).logits)


def test_lazy_equals_in_memory_in_float16(shards):
    """As read for a GPU (float16), computed here on the CPU: the same integers as quantizing from_pretrained's
    float16 model in memory (GPTQ's Hessians see every rounding difference in the hidden states)."""
    from zeroquant.models.hf import model_class, read_config

    calib = tiny_input(4, 16, seed=5)
    fp = model_class(read_config(shards, shards, {})).from_pretrained(shards, dtype=torch.float16).eval()
    want = zq.quantize(fp, "w4/8-a8+gptq", calib_data=calib, progress=False)
    model, _, blocks = open_lazy(shards, "cuda", tokenizer=False)  # moves nothing to the device by itself
    got = zq.quantize(model, "w4/8-a8+gptq", calib_data=calib, inplace=True, blocks=blocks, progress=False)
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_lazy_skeleton_builds_buffers_as_from_pretrained(arch, tmp_path):
    """For a GPU the model is read in float16 (open_lazy moves nothing to the device itself); buffers computed at
    init, such as rotary frequencies, keep the dtype and values from_pretrained gives them, not a float16 cast."""
    from zeroquant.models.hf import model_class

    tiny_model(arch).save_pretrained(tmp_path)
    ref = model_class(zq.models.hf.read_config(tmp_path, tmp_path, {})).from_pretrained(tmp_path, dtype=torch.float16)
    model, _, _ = open_lazy(tmp_path, "cuda", tokenizer=False)
    want, got = dict(ref.named_buffers()), dict(model.named_buffers())
    assert sorted(want) == sorted(got)
    assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)
    assert any(b.dtype == torch.float32 for b in got.values())  # what a cast to float16 lost
    assert next(model.parameters()).dtype == torch.float16


def test_lazy_refuses_missing_block_tensors_and_copies(shards, tmp_path):
    assert has_safetensors(shards) and not has_safetensors(tmp_path)
    model, _, blocks = open_lazy(shards, tokenizer=False)
    with pytest.raises(zq.ZeroQuantError, match="inplace=True"):
        zq.quantize(model, "w8a8", blocks=blocks, progress=False)
    blocks.weights.files.pop("model.layers.1.mlp.up_proj.weight")  # vanished after opening: found in its turn
    with pytest.raises(zq.ZeroQuantError, match="lacks model.layers.1.mlp.up_proj.weight"):
        zq.quantize(model, "w8a8", inplace=True, blocks=blocks, progress=False)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A GPT-NeoX as save_pretrained writes it: its head under the checkpoint's name `embed_out.weight`, which
    transformers 5 renames to the model's `lm_head.weight` on loading."""
    out = tmp_path_factory.mktemp("gpt_neox")
    tiny_model("gpt_neox").save_pretrained(out)
    return out


def test_lazy_reads_renamed_checkpoint_tensors_and_equals_in_memory(neox):
    pytest.importorskip("transformers.conversion_mapping")
    calib = tiny_input(4, 16, seed=5)
    fp, _ = zq.load_fp_model(neox, tokenizer=False)
    want = zq.quantize(fp, "w4/8-a8+gptq", calib_data=calib, progress=False)
    model, _, blocks = open_lazy(neox, tokenizer=False)
    got = zq.quantize(model, "w4/8-a8+gptq", calib_data=calib, inplace=True, blocks=blocks, progress=False)
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = tiny_input(2, 8, seed=9)
    assert torch.equal(want(ids).logits, got(ids).logits)


def test_renamed_head_is_the_checkpoints_embed_out(neox):
    from safetensors import safe_open

    pytest.importorskip("transformers.conversion_mapping")
    with safe_open(neox / "model.safetensors", "pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()  # else nothing is renamed here
        saved = f.get_tensor("embed_out.weight")
    model, _, blocks = open_lazy(neox, tokenizer=False)
    assert blocks.weights.renames == {"lm_head.weight": "embed_out.weight"}
    assert torch.equal(model.lm_head.weight, saved)
    assert not torch.equal(model.lm_head.weight, model.gpt_neox.embed_in.weight)  # not tied to the embeddings


def test_lazy_refuses_tensors_transformers_converts(neox, monkeypatch):
    """A tensor transformers would change on loading (split, merge, transpose), not only rename, is refused rather
    than read as saved; a converter whose result the model does not hold is no reason to refuse."""
    mapping = pytest.importorskip("transformers.conversion_mapping")
    from transformers.core_model_loading import Chunk, WeightConverter

    real = mapping.get_model_conversion_mapping
    extra = [WeightConverter(r"attention\.dense\.weight", "attention.dense.weight", operations=[Chunk(dim=0)])]
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", lambda model: [*real(model), *extra])
    with pytest.raises(zq.ZeroQuantError, match=r"converts 2 checkpoint tensor\(s\).*load_fp_model") as e:
        open_lazy(neox, tokenizer=False)
    assert "\n" not in str(e.value) and "gpt_neox.layers.0.attention.dense.weight ->" in str(e.value)
    extra[0] = WeightConverter(r"attention\.dense\.weight", "attention.fused.weight", operations=[Chunk(dim=0)])
    _, _, blocks = open_lazy(neox, tokenizer=False)
    assert blocks.weights.renames == {"lm_head.weight": "embed_out.weight"}  # the plain renames still apply


def test_without_conversion_mapping_nothing_is_renamed(neox, shards, monkeypatch):
    """transformers 4.x has no conversion mapping and loads keys as saved: the lazy loader renames nothing."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # its import fails
    model, _, blocks = open_lazy(shards, tokenizer=False)
    assert blocks.weights.renames == {}
    with pytest.raises(zq.ZeroQuantError, match="lack 1 tensor.*lm_head.weight"):
        open_lazy(neox, tokenizer=False)


MAKE = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=40, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=2048, max_position_embeddings=512, tie_word_embeddings=False)
with torch.device("meta"):
    m = LlamaForCausalLM(cfg)
m = m.to(torch.float16).to_empty(device="cpu")
g = torch.Generator().manual_seed(0)
for p in m.parameters():
    p.data.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
m.model.rotary_emb.inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
m.save_pretrained(sys.argv[1], max_shard_size="200MB")
"""

QUANTIZE = """
import json, resource, sys
from transformers import LlamaForCausalLM  # noqa: F401 - the baseline holds the libraries every run needs
import zeroquant.api  # noqa: F401
from zeroquant.tools.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
main(["quantize", sys.argv[1], "-o", sys.argv[2], "--preset", "w4/8-a8"])
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_host_memory_is_the_quantized_model_plus_a_block(tmp_path):
    """A random Llama of about 1 GB in fp16 shards, quantized by the CLI: the FP model never lives in memory whole,
    so the process's peak resident memory grows by less than 0.6x the shards' size over its libraries'."""
    import json
    import subprocess
    import sys

    src, out = tmp_path / "llama", tmp_path / "q"
    subprocess.run([sys.executable, "-c", MAKE, str(src)], check=True, capture_output=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size > 0.9e9 and len(list(src.glob("*.safetensors"))) > 1
    run = subprocess.run([sys.executable, "-c", QUANTIZE, str(src), str(out)], check=True, capture_output=True,
                         text=True)
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (rss["peak"] - rss["base"]) * 1024  # ru_maxrss is in KiB on Linux
    assert grown < 0.6 * size, f"peak RSS grew {grown / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of shards"
    assert (out / "quantization.json").exists()
