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


def test_lazy_refuses_missing_block_tensors_and_copies(shards, tmp_path):
    assert has_safetensors(shards) and not has_safetensors(tmp_path)
    model, _, blocks = open_lazy(shards, tokenizer=False)
    with pytest.raises(zq.ZeroQuantError, match="inplace=True"):
        zq.quantize(model, "w8a8", blocks=blocks, progress=False)
    blocks.weights.files.pop("model.layers.1.mlp.up_proj.weight")  # vanished after opening: found in its turn
    with pytest.raises(zq.ZeroQuantError, match="lacks model.layers.1.mlp.up_proj.weight"):
        zq.quantize(model, "w8a8", inplace=True, blocks=blocks, progress=False)
