"""Hostile but realistic inputs, continued: damaged checkpoints (load and info say so in one line), bytes that
must not vary between saves, and the Python API's refusals. Shared helpers and fixtures: hostile_cases.py."""

import json
import re

import pytest
import torch
import transformers
from conftest import missing_asset
from hostile_cases import STORIES, assert_one_line_error, no_load, run
from safetensors.torch import load_file, save_file

import zeroquant as zq
from zeroquant.tools.cli import main

pytest_plugins = ["hostile_cases"]


@pytest.fixture(autouse=True)
def _needs_stories():
    if not STORIES.exists():
        missing_asset("../shared/assets/stories260K")


# ---------------------------------------------------------------- 3-5. damaged checkpoints: load and info


def _edit_tensors(d, edit):
    t = load_file(d / "model.safetensors")
    edit(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _edit_manifest(d, edit):
    m = json.loads((d / "quantization.json").read_text())
    edit(m)
    (d / "quantization.json").write_text(json.dumps(m))


DOWN = "model.layers.1.mlp.down_proj"


def _damage(d, case):
    w = d / "model.safetensors"
    if case == "no_weights_file":
        w.unlink()
    elif case == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])
    elif case == "empty":
        w.write_bytes(b"")
    elif case == "corrupt":
        w.write_bytes(b"\xff" * 4096)
    elif case == "missing_tensor":
        _edit_tensors(d, lambda t: t.pop(f"{DOWN}.qweight"))
    elif case == "zero_scale":
        _edit_tensors(d, lambda t: t[f"{DOWN}.w_scale"].__setitem__((0, 0), 0))
    elif case == "zero_point_200":
        _edit_tensors(d, lambda t: t[f"{DOWN}.w_zero"].__setitem__((0, 0), 200))
    elif case == "no_weight_spec":
        _edit_manifest(d, lambda m: m["modules"][DOWN].pop("weight"))
    elif case == "modules_null":
        _edit_manifest(d, lambda m: m.__setitem__("modules", None))
    elif case == "autoconfig":
        _edit_manifest(d, lambda m: m.__setitem__("model_class", "AutoConfig"))


DAMAGE = {
    "no_weights_file": "has no model.safetensors",
    "truncated": "not a readable safetensors file",
    "empty": "not a readable safetensors file",
    "corrupt": "not a readable safetensors file",
    "missing_tensor": f"missing ['{DOWN}.qweight']",
    "zero_scale": f"{DOWN}.w_scale holds zero or negative scales",
    "zero_point_200": f"{DOWN}.w_zero holds zero points outside the integers 0..15 of 4 bits (e.g. 200)",
    "no_weight_spec": f"module {DOWN}: KeyError: 'weight'",
    "modules_null": '"modules" must map module names to their specs, got null',
    "autoconfig": "model_class: AutoConfig is not a transformers model class",
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_load_is_one_line(case, q4):
    _damage(q4, case)
    with pytest.raises(zq.ZeroQuantError) as e:
        zq.load_quantized(q4)
    assert DAMAGE[case] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", DAMAGE)
def test_info_says_damaged(case, q4, capsys):
    _damage(q4, case)
    rc, so, err = run(["info", q4], capsys)
    assert_one_line_error(rc, err, DAMAGE[case])
    assert so == ""
    if case not in ("modules_null", "autoconfig"):  # manifest-level errors are the reader's own
        assert "damaged checkpoint" in err


@pytest.mark.parametrize("storage,expect", [
    ("pack-quantized", "64 values of 3 bits pack into 6 int32 words"),
    ("int-quantized", r"outside -4\.\.3 of the 3 bits its config says"),
])
def test_compressed_tensors_bits_must_fit_the_integers(storage, expect, tmp_path, capsys):
    """A config claiming 3 bits over 8-bit integers, packed (unpacking would read other bits) or as int8."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ct = tmp_path / "ct"
    args = ["quantize", STORIES, "--preset", "w8a16", "-o", ct, "--format", "compressed-tensors", "--device", "cpu"]
    assert run(args, capsys)[0] == 0
    cfg = json.loads((ct / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"]["num_bits"], g["format"] = 3, storage
    (ct / "config.json").write_text(json.dumps(cfg))
    if storage == "int-quantized":
        def unpack(t):
            for name in [n for n in t if n.endswith(".weight_packed")]:
                prefix = name.removesuffix("_packed")
                t[prefix] = unpack_from_int32(t.pop(name), 8, torch.Size(t.pop(f"{prefix}_shape").tolist()))
        _edit_tensors(ct, unpack)
    with pytest.raises(zq.ZeroQuantError, match=expect):
        zq.load_quantized(ct)


def test_truncated_compressed_tensors_info_says_damaged(tmp_path, capsys):
    ct = tmp_path / "ct"
    args = ["quantize", STORIES, "--preset", "w8a16", "-o", ct, "--format", "compressed-tensors", "--device", "cpu"]
    assert run(args, capsys)[0] == 0
    w = ct / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    rc, _, err = run(["info", ct], capsys)
    assert_one_line_error(rc, err, "damaged checkpoint")


@pytest.mark.parametrize("args", [["--preset", "w4a16+smooth"], ["--preset", "w8a16", "--smooth", "0.5"]])
def test_smoothing_a_weight_only_preset_is_refused(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
    rc, _, err = run(["quantize", STORIES, *args, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "does nothing for")


def test_identical_saves_are_identical_bytes(q4_saved, tmp_path):
    """safetensors orders __metadata__ by a per-process hash: the save sorts it, so a checkpoint's sha256
    identifies it."""
    model = zq.load_quantized(q4_saved, fuse=False)
    a, b = (zq.save_quantized(model, tmp_path / n) for n in ("a", "b"))
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    raw = (a / "model.safetensors").read_bytes()
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) >= 2


# ---------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def stories_fp():
    return zq.load_fp_model(STORIES)


@pytest.mark.parametrize("data,expect", [
    (42, "calibration data of type int"),
    (torch.rand(2, 64), "token ids must be integers, got a torch.float32 tensor"),
    (torch.full((2, 64), 512), "the model's vocabulary is 0..511"),
    ([torch.full((1, 64), -1)], "span -1..-1"),
    ("no/such/valid.txt", "is no file"),
])
def test_api_refuses_calibration_data_it_cannot_use(data, expect, stories_fp):
    model, tok = stories_fp
    with pytest.raises(zq.ZeroQuantError, match=re.escape(expect)):
        zq.quantize(model, "w8a8-static", calib_data=data, tokenizer=tok, progress=False)


def test_api_calibration_data_may_be_a_path(stories_fp, story):
    model, tok = stories_fp
    q = zq.quantize(model, "w8a8-static", calib_data=str(story), tokenizer=tok, progress=False)
    assert all(m.a_scale.item() > 0 for m in zq.quantized_modules(q).values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_api_load_on_cuda_without_a_gpu_is_one_line(q4_saved):
    with pytest.raises(zq.ZeroQuantError, match="device cuda: no CUDA GPU is available here"):
        zq.load_quantized(q4_saved, device="cuda")


def test_unused_tensors_are_one_warning_line(fp, tmp_path, capsys):
    _edit_tensors(fp, lambda t: t.__setitem__("extra.head.weight", torch.zeros(4)))
    rc, _, err = run(["quantize", fp, "--preset", "w8a16", "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert rc == 0
    warnings = [line for line in re.split(r"[\r\n]", err) if line.startswith("zeroquant: warning: ")]
    assert len(warnings) == 1 and "1 tensor(s) the model does not use, ignored: extra.head.weight" in warnings[0]
    assert "UNEXPECTED" not in err


def test_saving_a_meta_device_model_is_one_line_and_writes_nothing(tmp_path):
    from tiny_models import CONFIGS

    q = zq.quantize(transformers.LlamaForCausalLM(CONFIGS["llama"]()), "w8a16", progress=False).to("meta")
    with pytest.raises(zq.ZeroQuantError, match="is on the meta device"):
        zq.save_quantized(q, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_eval_json_under_a_missing_directory_fails_before_the_work(story, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
    rc, _, err = run(["eval", STORIES, "--text", story, "--presets", "w8a8", "--json", tmp_path / "no" / "r.json",
                      "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(zq.ZeroQuantError, match="not a zeroquant checkpoint"):
        main(["info", str(tmp_path), "--debug"])


def test_a_model_quantized_by_another_tool_is_refused(fp, tmp_path, capsys):
    cfg = json.loads((fp / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fp / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run(["quantize", fp, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "is already quantized (gptq")
