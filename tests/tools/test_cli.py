import subprocess
import sys

import pytest
import transformers as T
from tiny_models import tiny_model

from zeroquant.tools.cli import main

TEXT = " ".join(f"sentence {i} of the file says the same thing again ." for i in range(300))


@pytest.fixture
def model_dir(tmp_path, minilm):
    _, tok = minilm
    d = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def run(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (save_pretrained progress bars)
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quantize_info_eval_happy_path(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc, so, _ = run(["quantize", model_dir, "--preset", "w4/8-a8", "-o", out, "--device", "cpu"], capsys)
    assert rc == 0 and "saved w4/8-a8" in so
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    rc, so, _ = run(["info", out], capsys)
    assert rc == 0 and "8 linear layers" in so and "W4 g128 asym / A8 token" in so
    rc, so, _ = run(["eval", model_dir, "--text", text_file, "--presets", "w8a8,rtn-w4", "--seq-len", "64",
                     "--device", "cpu"], capsys)
    assert rc == 0
    lines = [line for line in so.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| scheme |") and "ppl" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["float32", "w8a8", "rtn-w4"]


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_dir", "model directory not found"),
        ("not_model_dir", "not a Hugging Face model directory"),
        ("unsupported", "unsupported architecture 'bloom'"),
        ("group_size", "group_size must be positive or -1"),
        ("empty_text", "text file is empty"),
        ("unknown_preset", "unknown preset 'w5a5'"),
        ("static_no_calib", "need --calib FILE"),
        ("gptq_no_calib", "need --calib FILE"),
        ("not_a_model_file", "neither a Hugging Face model directory nor a .gguf file"),
        ("bad_gguf", "cannot read the model config"),
        ("info_not_ckpt", "not a zeroquant checkpoint"),
        ("export_conv1d", "Conv1D layer: compressed-tensors and vLLM quantize nn.Linear layers only"),
        ("export_not_ckpt", "not a zeroquant checkpoint"),
    ],
)
def test_errors_are_one_line_and_nonzero(case, expect, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"GGUF but not really")
    bloom = tmp_path / "bloom"
    T.BloomForCausalLM(T.BloomConfig(vocab_size=1000, hidden_size=64, n_layer=1, n_head=4)).save_pretrained(bloom)
    args = {
        "missing_dir": ["quantize", tmp_path / "nope", "-o", out],
        "not_model_dir": ["quantize", plain, "-o", out],
        "unsupported": ["quantize", bloom, "-o", out, "--device", "cpu"],
        "group_size": ["quantize", model_dir, "--group-size", "0", "-o", out, "--device", "cpu"],
        "empty_text": ["eval", model_dir, "--text", empty],
        "unknown_preset": ["eval", model_dir, "--text", text_file, "--presets", "w8a8,w5a5"],
        "static_no_calib": ["eval", model_dir, "--text", text_file, "--presets", "w8a8-static"],
        "gptq_no_calib": ["eval", model_dir, "--text", text_file, "--presets", "w8a8,w4a16+gptq"],
        "not_a_model_file": ["quantize", text_file, "-o", out],
        "bad_gguf": ["quantize", bad_gguf, "-o", out],
        "info_not_ckpt": ["info", plain],
        "export_conv1d": ["quantize", model_dir, "-o", out, "--device", "cpu", "--format", "compressed-tensors"],
        "export_not_ckpt": ["export", plain, "-o", out],
    }[case]
    rc, _, err = run(args, capsys)
    assert rc == 2
    assert expect in err
    assert err.splitlines()[-1].startswith("zeroquant: error: ") and err.count("zeroquant: error") == 1
    assert "Traceback" not in err
    assert not out.exists()


def test_quantize_gptq_saves_gptq_config(model_dir, text_file, tmp_path, capsys):
    import json

    out = tmp_path / "g"
    rc, so, _ = run(["quantize", model_dir, "--preset", "w4a16", "--gptq", "--calib", text_file, "--calib-samples",
                     "32", "-o", out, "--device", "cpu"], capsys)
    assert rc == 0 and "saved w4a16+gptq" in so
    cfg = json.loads((out / "quantization.json").read_text())["config"]
    assert cfg["mlp"]["rounding"] == "gptq" and cfg["attention"]["rounding"] == "gptq"


def test_export_writes_what_quantize_format_writes(minilm, tmp_path, capsys):
    """`quantize --format compressed-tensors` and `quantize` + `export` give the same files; both load back
    onto zeroquant with the logits of the zeroquant checkpoint (to float rounding: the default's progressive INT4
    comes back as float32 group scales s1 * s2, whose integer path scales each group's sum)."""
    import torch
    from safetensors.torch import load_file
    from tiny_models import model_output, tiny_input

    import zeroquant as zq

    _, tok = minilm
    src = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(src)
    tok.save_pretrained(src)
    common = [src, "--preset", "w4/8-a8-g32", "--device", "cpu"]
    assert run(["quantize", *common, "-o", tmp_path / "zq"], capsys)[0] == 0
    rc, so, _ = run(["export", tmp_path / "zq", "-o", tmp_path / "ct"], capsys)
    assert rc == 0 and "as compressed-tensors" in so
    assert run(["quantize", *common, "-o", tmp_path / "direct", "--format", "compressed-tensors"], capsys)[0] == 0
    a, b = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    ids = tiny_input()
    torch.testing.assert_close(model_output(zq.load_quantized(tmp_path / "ct"), ids),
                               model_output(zq.load_quantized(tmp_path / "zq"), ids), rtol=0, atol=1e-5)
    rc, so, _ = run(["info", tmp_path / "ct"], capsys)
    assert rc == 0 and "W4 group 32 asym / A8 token dynamic (int-quantized)" in so


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "zeroquant.tools.cli", "quantize", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "w4/8-a8" in r.stdout and "--group-size" in r.stdout
