"""The compressed-tensors export and import, checked against the format's own libraries: compressed-tensors
(its packers, its decompressor, its writer) and transformers' loader."""

import json

import pytest
import torch
from conftest import ASSETS, missing_asset
from safetensors import safe_open
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.core import quant as Q

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

STORIES = ASSETS / "stories260K"


def load_model(name: str):
    """(model, group-size suffix that divides its layers): tiny Llama and OPT take groups of 32; stories260K's
    MLP is 172 wide, so its INT4 groups are per output channel."""
    if name == "stories260k":
        if not (STORIES / "config.json").exists():
            missing_asset("../shared/assets/stories260K")
        return AutoModelForCausalLM.from_pretrained(STORIES).eval(), "-ch"
    return tiny_model(name), "-g32"


def ids_for(model) -> torch.Tensor:
    return tiny_input() % model.config.vocab_size


def export(model, preset: str, out, fuse: bool = True):
    q = zq.quantize(model, preset, calib_data=tiny_input(4, 16, seed=5) % model.config.vocab_size, progress=False,
                    fuse=fuse)
    return zq.set_mode(q, "ref"), zq.save_quantized(q, out, format="compressed-tensors")


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def ct_fake_quant_tokens(x, bits=8):
    """compressed-tensors' dynamic "token" QDQ as transformers runs it: max |x| over the dims after the first two,
    / 127.5, over the signed range -128..127. That is per token of a [batch, seq, hidden] input, but one scale for
    the whole of a 2-D one (OPT's MLP flattens its tokens). zeroquant, like INT8 GEMM kernels, scales each token
    by its max / 127."""
    dims = tuple(range(2, x.ndim))
    amax = x.detach().float().abs()
    amax = amax.amax(dims, keepdim=True) if dims else amax.amax()
    scale = torch.where(amax == 0, torch.finfo(x.dtype).eps, amax / 127.5).to(x.dtype)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


MODELS = ["llama", "opt", "stories260k"]


@pytest.mark.parametrize("name", MODELS)
def test_transformers_runs_exported_w8a8(tmp_path, monkeypatch, name):
    model, _ = load_model(name)
    # unfused, so that both sides add the bias and apply the activation in the same float operations: a
    # last-bit difference there can flip a token-wise rounding downstream
    q, out = export(model, "w8a8", tmp_path / "ct", fuse=False)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # compressed-tensors' QDQ modules, default path
    ids = ids_for(model)
    got = model_output(hf, ids)
    for n, m in zq.quantized_modules(q).items():
        assert torch.equal(hf.get_submodule(n).weight, m.quantized.dequantize())
    monkeypatch.setattr(Q, "fake_quantize_per_token", ct_fake_quant_tokens)
    torch.testing.assert_close(got, model_output(zq.set_mode(q, "fake"), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_transformers_runs_exported_w4a16(tmp_path, name):
    model, suffix = load_model(name)
    q, out = export(model, f"w4a16{suffix}", tmp_path / "ct")
    # transformers' default path cannot load asymmetric pack-quantized files (its meta-device compression leaves
    # the zero point unpacked); its dequantize=True path runs compressed-tensors' decompressor at load time
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = ids_for(model)
    torch.testing.assert_close(model_output(hf.eval(), ids), model_output(q, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_compressed_tensors_decompresses_w4_8_a16(tmp_path, name):
    """Mixed precision: compressed-tensors' decompressor, group by group, gives our integers and weights, and
    the FP model holding those weights gives our logits."""
    model, suffix = load_model(name)
    q, out = export(model, f"w4/8-a16{suffix}", tmp_path / "ct")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert {g.format for g in qc.config_groups.values()} == {"pack-quantized"} and len(qc.config_groups) == 2
    file = tensors(out)
    dense = {k: v for k, v in file.items() if k.rsplit(".", 1)[0] not in zq.quantized_modules(q)}
    for name_, m in zq.quantized_modules(q).items():
        scheme = next(g for g in qc.config_groups.values() if g.weights.num_bits == m.wq.bits)
        sd = {k.removeprefix(name_ + "."): v for k, v in file.items() if k.startswith(name_ + ".")}
        off = 0 if m.wq.symmetric else 1 << (m.wq.bits - 1)
        ints = unpack_from_int32(sd["weight_packed"], m.wq.bits, sd["weight_shape"])
        assert torch.equal(ints.to(torch.int16) + off, m.quantized.ints().to(torch.int16))
        w = BaseCompressor.get_value_from_registry(scheme.format).decompress(sd, scheme)["weight"]
        assert torch.equal(w, m.quantized.dequantize())
        dense[f"{name_}.weight"] = w
    fp = type(model)(model.config).eval()
    fp.load_state_dict(dense, strict=False)
    fp.tie_weights()
    ids = ids_for(model)
    torch.testing.assert_close(model_output(fp, ids), model_output(q, ids), rtol=1e-5, atol=1e-5)


def test_transformers_runs_symmetric_mixed_precision(tmp_path):
    """Two config groups (INT4 MLP, INT8 attention) through transformers' default loader."""
    w4 = zq.WeightQuant(4, 32, symmetric=True)
    cfg = zq.QuantConfig(attention=zq.LinearRule(zq.PRESETS["w8a8"].attention.weight),
                         mlp=zq.LinearRule(w4), name="w4sym/8-a16")
    model = tiny_model("llama")
    q, out = export(model, cfg, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ids_for(model)
    torch.testing.assert_close(model_output(hf, ids), model_output(q, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt", "bert", "gpt_neox"])
@pytest.mark.parametrize("preset", ["w8a8", "w4a16-g32", "w4/8-a8-g32+fp16scale", "w8a8-static", "rtn-w4"])
def test_export_then_import_identical(tmp_path, arch, preset):
    """(Progressive INT4, w4/8-a8's own, comes back as float32 group scales s1 * s2, its outputs equal to float
    rounding: tests/nn/test_progressive.py.)"""
    model = tiny_model(arch)
    q, out = export(model, preset, tmp_path / "ct")
    back = zq.load_quantized(out)
    ids = tiny_input()
    assert torch.equal(model_output(zq.set_mode(back, "ref"), ids), model_output(q, ids))
    mods = zq.quantized_modules(back)
    assert sorted(mods) == sorted(zq.quantized_modules(q))
    for n, m in zq.quantized_modules(q).items():
        assert torch.equal(mods[n].qweight, m.qweight) and torch.equal(mods[n].w_scale, m.w_scale)
    assert back.zeroquant.config.mlp.weight.bits == q.zeroquant.config.mlp.weight.bits


def _ct_written(model, out, weights: dict, activations: dict | None = None):
    """A checkpoint written the way llm-compressor saves one: compressed-tensors' own scheme application, its
    min-max qparams, its compressor and its config writer."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    qc = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for m in model.modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None:
            continue
        w = m.weight.detach()
        w = w.unflatten(-1, (-1, s.weights.group_size)) if s.weights.group_size else w.unsqueeze(1)
        scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), s.weights)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(out)
    comp.update_config(out)
    comp.decompress_model(model)
    return model


@pytest.mark.parametrize("weights,acts", [
    ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}, None),
    ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}, None),
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
     {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}),
])
def test_imports_a_checkpoint_compressed_tensors_wrote(tmp_path, monkeypatch, weights, acts):
    ref = _ct_written(tiny_model("llama"), tmp_path / "ct", weights, acts)
    ours = zq.quantize(tiny_model("llama"), zq.QuantConfig(
        attention=zq.LinearRule(zq.WeightQuant(8, -1)), mlp=zq.LinearRule(zq.WeightQuant(8, -1))), progress=False)
    zq.save_quantized(ours, tmp_path / "ours", format="compressed-tensors")
    loaded = zq.load_quantized(tmp_path / "ct")
    mods = zq.quantized_modules(loaded)
    assert len(mods) == 14 and all(m.wq.bits == weights["num_bits"] for m in mods.values())
    for n, m in mods.items():
        assert torch.equal(m.quantized.dequantize(), ref.get_submodule(n).weight)
    ids = tiny_input()
    if acts is not None:
        monkeypatch.setattr(Q, "fake_quantize_per_token", ct_fake_quant_tokens)
    torch.testing.assert_close(model_output(zq.set_mode(loaded, "fake"), ids), model_output(ref, ids),
                               rtol=1e-5, atol=1e-5)


def test_export_names_tensors_as_compressed_tensors_does(tmp_path):
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    _ct_written(tiny_model("llama"), tmp_path / "theirs", weights)
    q = zq.quantize(tiny_model("llama"), zq.QuantConfig(
        attention=zq.LinearRule(zq.WeightQuant(4, 32, False)), mlp=zq.LinearRule(zq.WeightQuant(4, 32, False))),
        progress=False)
    zq.save_quantized(q, tmp_path / "ours", format="compressed-tensors")
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k


@pytest.mark.parametrize("arch,preset,match", [
    ("gpt2", "w8a8", "Conv1D"),
    ("llama", "w4a16-g48", "no short last group.*-g64 or -ch"),
])
def test_export_refuses_what_the_format_cannot_spell(tmp_path, arch, preset, match):
    q = zq.quantize(tiny_model(arch), preset, progress=False)
    with pytest.raises(zq.ZeroQuantError, match=match):
        zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit,match", [
    (lambda g: g["weights"].update(type="float"), "weights of type float has no zeroquant kernel"),
    (lambda g: g["weights"].update(strategy="block", block_structure=[32, 32], group_size=None),
     "block weight has no zeroquant kernel"),
    (lambda g: g.update(input_activations={"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                                           "dynamic": True}), "activations .* has no zeroquant kernel"),
])
def test_import_refuses_schemes_without_kernels(tmp_path, edit, match):
    q = zq.quantize(tiny_model("llama"), "w4a16-g32", progress=False)
    out = zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"]["config_groups"]["group_0"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(zq.ZeroQuantError, match=match) as e:
        zq.load_quantized(out)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_half_model_round_trips_in_half(tmp_path):
    """The importer takes the float weights' dtype from the file (config.json's may predate a .half())."""
    q = zq.quantize(tiny_model("llama"), "w4/8-a8", progress=False).half()
    zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "float16"
    back = zq.load_quantized(tmp_path / "ct")
    assert back.model.embed_tokens.weight.dtype == torch.float16
    assert back.model.layers[0].mlp.down_proj.w_scale.dtype == torch.float32
    ids = tiny_input()
    assert torch.equal(model_output(back, ids), model_output(q, ids))


def _drop_scale(t):
    del t["model.layers.1.mlp.up_proj.weight_scale"]


def _add_g_idx(t):
    t["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.arange(64, dtype=torch.int32) // 32


def _shrink_norm(t):
    t["model.norm.weight"] = t["model.norm.weight"][:-1].clone()


def _bad_zero_point(t):
    t["model.layers.0.mlp.up_proj.weight_zero_point"] = torch.zeros(3, 2, dtype=torch.int32)


def _nan_scale(t):
    t["model.layers.0.mlp.up_proj.weight_scale"][0, 0] = float("nan")


@pytest.mark.parametrize("edit,match", [
    (_drop_scale, r"model.layers.1.mlp.up_proj.weight_scale is missing"),
    (_add_g_idx, r"up_proj.weight_g_idx: activation-ordered groups have no zeroquant kernel"),
    (_shrink_norm, r"model.norm.weight is torch.float32 \[63\], the model expects torch.float32 \[64\]"),
    (_bad_zero_point, r"up_proj.weight_zero_point"),
    (_nan_scale, r"up_proj.weight_scale holds NaN or infinite values"),
])
def test_import_names_the_tensor_it_cannot_take(tmp_path, edit, match):
    from safetensors.torch import save_file

    q = zq.quantize(tiny_model("llama"), "w4a16-g32", progress=False)
    out = zq.save_quantized(q, tmp_path / "ct", format="compressed-tensors")
    t = tensors(out)
    edit(t)
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(zq.ZeroQuantError, match=match) as e:
        zq.load_quantized(out)
    assert "\n" not in str(e.value)


def test_imports_sharded_checkpoint(tmp_path):
    """llm-compressor saves large models in shards (model-0000k-of-0000n.safetensors + an index)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    ref = _ct_written(tiny_model("llama"), tmp_path / "ct", weights)
    # re-save the same compressed files in shards, as save_pretrained does for large models
    t = tensors(tmp_path / "ct")
    from safetensors.torch import save_file

    names = sorted(t)
    half = len(names) // 2
    (tmp_path / "ct" / "model.safetensors").unlink()
    for i, part in enumerate([names[:half], names[half:]]):
        save_file({k: t[k] for k in part}, str(tmp_path / "ct" / f"model-0000{i + 1}-of-00002.safetensors"),
                  metadata={"format": "pt"})
    loaded = zq.load_quantized(tmp_path / "ct")
    ids = tiny_input()
    torch.testing.assert_close(model_output(zq.set_mode(loaded, "fake"), ids), model_output(ref, ids),
                               rtol=1e-5, atol=1e-5)
