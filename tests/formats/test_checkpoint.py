import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.formats import checkpoint


@pytest.mark.parametrize("arch,preset", [("gpt2", "w4/8-a8"), ("llama", "w4a16"), ("bert", "w8a8-static"),
                                         ("opt", "rtn-w4")])
def test_save_load_identical_logits(tmp_path, arch, preset):
    model = tiny_model(arch)
    ids = tiny_input()
    q = zq.quantize(model, preset, calib_data=tiny_input(4, 16, seed=5), progress=False)
    out = zq.save_quantized(q, tmp_path / "q")
    loaded = zq.load_quantized(out)
    assert torch.equal(model_output(q, ids), model_output(loaded, ids))
    assert loaded.zeroquant.config == q.zeroquant.config
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
    with pytest.raises(zq.ZeroQuantError, match="cannot write .*: disk full; nothing was written"):
        zq.save_quantized(q, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_dir_but_replaces_checkpoint(tmp_path):
    q = zq.quantize(tiny_model("gpt2"), "w8a8", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(zq.ZeroQuantError, match="not empty and not a zeroquant checkpoint"):
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


def _damaged(tmp_path, case):
    """A saved w4/8-a8 tiny Llama, then one thing wrong with it."""
    from safetensors.torch import load_file, save_file

    out = zq.save_quantized(zq.quantize(tiny_model("llama"), "w4/8-a8", progress=False), tmp_path / "q")
    weights, manifest = out / "model.safetensors", out / "quantization.json"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif case in ("missing", "shape", "dtype", "nan_scale"):
        t = load_file(str(weights))
        name = "model.layers.0.mlp.down_proj." + ("w_row_scale" if case == "nan_scale" else "qweight")
        if case == "missing":
            del t[name]
        elif case == "shape":
            t[name] = t[name][:, :-1].contiguous()
        elif case == "dtype":
            t[name] = t[name].to(torch.int16)
        else:
            t[name][0, 0] = float("nan")
        save_file(t, str(weights), metadata={"format": "pt"})
    elif case == "not_json":
        manifest.write_text("{ not json")
    elif case == "version":
        m = json.loads(manifest.read_text())
        m["version"] = 99
        manifest.write_text(json.dumps(m))
    elif case == "bad_module":
        m = json.loads(manifest.read_text())
        m["modules"]["model.layers.0.mlp.down_proj"]["weight"]["bits"] = 12
        manifest.write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("case,expect", [
    ("truncated", "model.safetensors: not a readable safetensors file"),
    ("garbage", "model.safetensors: not a readable safetensors file"),
    ("missing", "does not match the model: missing ['model.layers.0.mlp.down_proj.qweight']"),
    ("shape", "down_proj.qweight is torch.uint8 [64, 63], the model expects torch.uint8 [64, 64]"),
    ("dtype", "down_proj.qweight is torch.int16 [64, 64], the model expects torch.uint8"),
    ("nan_scale", "down_proj.w_row_scale holds NaN or infinite values"),
    ("not_json", "quantization.json: not valid JSON"),
    ("version", "quantization.json: format version 99; this zeroquant reads version 2"),
    ("bad_module", "quantization.json: module model.layers.0.mlp.down_proj: ZeroQuantError: weight bits"),
])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, case, expect):
    out = _damaged(tmp_path, case)
    with pytest.raises(zq.ZeroQuantError) as e:
        zq.load_quantized(out)
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["not_json", "version"])
def test_cli_info_on_damaged_manifest_exits_2(tmp_path, case, capsys):
    from zeroquant.tools.cli import main

    out = _damaged(tmp_path, case)
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroquant: error: ") and "quantization.json" in err and "Traceback" not in err


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert"])
def test_load_builds_no_float_linears_and_keeps_ties(tmp_path, arch):
    """The skeleton is built on the meta device and filled from the file: every tensor ends up real, a tied
    LM head is the embedding again, and the quantized linears hold exactly the file's integers."""
    from safetensors.torch import load_file

    q = zq.quantize(tiny_model(arch), "w4/8-a8", progress=False)
    out = zq.save_quantized(q, tmp_path / "q")
    loaded = zq.load_quantized(out)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    if loaded.config.tie_word_embeddings and hasattr(loaded, "get_output_embeddings"):
        head = loaded.get_output_embeddings()
        if head is not None:
            assert head.weight is loaded.get_input_embeddings().weight
    stored = load_file(str(out / "model.safetensors"))
    for name, m in zq.quantized_modules(loaded).items():
        assert torch.equal(m.qweight, stored[f"{name}.qweight"])
        # G-major (float16-scale INT4: interleaved with the zero points), as the kernels read it in place
        kw = m.quantized.kernel()
        interleaved = m.wq.bits == 4 and not m.wq.progressive
        assert kw.scale.data_ptr() == m.w_scale.data_ptr() and kw.sz_step == (2 if interleaved else 1)
