import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant import checkpoint


@pytest.mark.parametrize("arch,preset", [("gpt2", "w4/8-a8"), ("llama", "w4a16"), ("bert", "w8a8-static"),
                                         ("opt", "rtn-w4")])
def test_save_load_identical_logits(tmp_path, arch, preset):
    model = tiny_model(arch)
    ids = tiny_input()
    q = zq.quantize(model, preset, calib_data=tiny_input(4, 16, seed=5), progress=False)
    out = zq.save_quantized(q, tmp_path / "q")
    loaded = zq.load_quantized(out)
    assert torch.equal(model_output(q, ids), model_output(loaded, ids))
    assert loaded.zeroquant_config == q.zeroquant_config
    assert sorted(zq.quantized_modules(loaded)) == sorted(zq.quantized_modules(q))


def test_int4_is_stored_packed(tmp_path):
    q = zq.quantize(tiny_model("llama"), "w4/8-a16", progress=False)
    zq.save_quantized(q, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        qp = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert down.dtype == torch.uint8 and down.shape == (64, 64)  # [out=64, in=128/2]
    assert qp.dtype == torch.int8 and qp.shape == (64, 64)
    manifest = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert manifest["preset"] == "w4/8-a16"
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["weight"]["bits"] == 4


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    q = zq.quantize(tiny_model("gpt2"), "w8a8", progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        zq.save_quantized(q, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_dir_but_replaces_checkpoint(tmp_path):
    q = zq.quantize(tiny_model("gpt2"), "w8a8", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(zq.ZeroQuantError, match="refusing to overwrite"):
        zq.save_quantized(q, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"
    zq.save_quantized(q, tmp_path / "q")
    q2 = zq.quantize(tiny_model("gpt2"), "w4a16", progress=False)
    zq.save_quantized(q2, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["preset"] == "w4a16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "q"]


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(zq.ZeroQuantError, match="not a zeroquant checkpoint"):
        zq.load_quantized(tmp_path)


def test_save_unquantized_model_is_an_error(tmp_path):
    with pytest.raises(zq.ZeroQuantError, match="not quantized"):
        zq.save_quantized(tiny_model("gpt2"), tmp_path / "q")
    assert not (tmp_path / "q").exists()
