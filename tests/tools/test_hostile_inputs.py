"""Hostile but realistic inputs (issue 41): nothing a user owns is lost, no random weights with exit 0, and
every error is one line with exit status 2. The models are stories260K (a real tiny Llama) and copies of it
with one thing wrong."""

import json
import os
import re
import shutil
import signal

import pytest
import torch
import transformers
from conftest import ASSETS, missing_asset
from safetensors.torch import load_file, save_file

import zeroquant as zq
from zeroquant.core.config import resolve_config
from zeroquant.formats import checkpoint, output_dir
from zeroquant.tools.cli import _raise_interrupt, main

STORIES = ASSETS / "stories260K"


@pytest.fixture(autouse=True)
def _needs_stories():
    if not STORIES.exists():
        missing_asset("../shared/assets/stories260K")

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 40


def run(args, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def last_line(err: str) -> str:
    """What stderr ends with, after the progress bars' carriage returns."""
    return re.split(r"[\r\n]", err.strip())[-1]


def assert_one_line_error(rc, err, expect):
    """Exit status 2 and one line (after any progress bars) naming what is wrong."""
    assert rc == 2, err
    last = last_line(err)
    assert last.startswith("zeroquant: error: ") and err.count("zeroquant:") == 1, err
    assert "Traceback" not in err and expect in last, err


@pytest.fixture
def fp(tmp_path):
    """A writable copy of stories260K."""
    d = tmp_path / "fp"
    shutil.copytree(STORIES, d)
    for f in d.iterdir():
        f.chmod(0o644)
    d.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def q4_saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "q4"
    model, tok = zq.load_fp_model(STORIES)
    zq.save_quantized(zq.quantize(model, "w4a16", progress=False), d, tokenizer=tok)
    return d


@pytest.fixture
def q4(q4_saved, tmp_path):
    """A fresh copy of a w4a16 checkpoint of stories260K, for a test to damage."""
    d = tmp_path / "q4"
    shutil.copytree(q4_saved, d)
    return d


@pytest.fixture
def story(tmp_path):
    p = tmp_path / "story.txt"
    p.write_text(STORY)
    return p


# ---------------------------------------------------------------- 1. no random weights with exit 0


@pytest.mark.parametrize("cmd", ["quantize", "eval"])
def test_quantized_checkpoint_is_not_loaded_as_a_float_model(cmd, q4, story, tmp_path, capsys):
    args = ["-o", tmp_path / "q5"] if cmd == "quantize" else ["--text", story, "--presets", "w8a8"]
    rc, _, err = run([cmd, q4, *args, "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "is a zeroquant quantized checkpoint")
    assert not (tmp_path / "q5").exists()


def test_compressed_tensors_checkpoint_is_not_loaded_as_a_float_model(tmp_path, capsys):
    args = ["quantize", STORIES, "--preset", "w8a16", "-o", tmp_path / "ct", "--format", "compressed-tensors"]
    assert run([*args, "--device", "cpu"], capsys)[0] == 0
    rc, _, err = run(["quantize", tmp_path / "ct", "-o", tmp_path / "q5", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "is a compressed-tensors quantized checkpoint")


def test_float_model_missing_a_tensor_is_refused(fp, tmp_path, capsys):
    t = load_file(fp / "model.safetensors")
    del t["model.layers.2.mlp.up_proj.weight"]
    save_file(t, fp / "model.safetensors", metadata={"format": "pt"})
    rc, _, err = run(["quantize", fp, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "lack 1 tensor(s) the model needs: model.layers.2.mlp.up_proj.weight")
    assert not (tmp_path / "q").exists()


def test_truncated_float_model_is_one_line(fp, tmp_path, capsys):
    w = fp / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc, _, err = run(["quantize", fp, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "cannot load the model in")


# ---------------------------------------------------------------- 2. user files are never deleted


def test_quantize_into_a_checkpoint_keeps_the_users_files(q4, capsys):
    (q4 / "NOTES.md").write_text("mine")
    rc, so, err = run(["quantize", STORIES, "--preset", "w8a16", "-o", q4, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert (q4 / "NOTES.md").read_text() == "mine"
    assert json.loads((q4 / "quantization.json").read_text())["preset"] == "w8a16"
    assert zq.load_quantized(q4).zeroquant.config.name == "w8a16"


def test_export_over_a_checkpoint_drops_its_manifest_and_keeps_the_users_files(tmp_path, capsys):
    q8, out = tmp_path / "q8", tmp_path / "out"
    for d in (q8, out):
        assert run(["quantize", STORIES, "--preset", "w8a16", "-o", d, "--device", "cpu"], capsys)[0] == 0
    (out / "NOTES.md").write_text("mine")
    assert run(["export", q8, "-o", out], capsys)[0] == 0
    assert (out / "NOTES.md").read_text() == "mine" and not (out / "quantization.json").exists()
    assert checkpoint.checkpoint_format(out) == "compressed-tensors"


def test_foreign_directory_is_refused_untouched_and_overwrite_keeps_its_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    rc, _, err = run(["quantize", STORIES, "-o", out, "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "not empty and not a zeroquant checkpoint")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    rc, _, err = run(["quantize", STORIES, "-o", out, "--device", "cpu", "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "thesis.tex").read_text() == "mine" and (out / "quantization.json").exists()


def test_output_in_current_directory_is_refused(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for o in (".", ".."):
        rc, _, err = run(["quantize", STORIES, "-o", o, "--device", "cpu"], capsys)
        assert_one_line_error(rc, err, "is the current directory or holds it")
    assert work.is_dir() and list(work.iterdir()) == []


def test_export_onto_its_input_is_refused(q4, capsys):
    before = sorted(p.name for p in q4.iterdir())
    rc, _, err = run(["export", q4, "-o", q4], capsys)
    assert_one_line_error(rc, err, "is the input")
    assert sorted(p.name for p in q4.iterdir()) == before and checkpoint.checkpoint_format(q4) == "zeroquant"


# ---------------------------------------------------------------- 3. one line instead of a traceback


def _no_load(*a, **k):
    raise AssertionError("the model was loaded before the check")


def test_output_under_a_file_fails_before_the_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
    rc, _, err = run(["quantize", STORIES, "-o", tmp_path / "afile" / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "is a file, not a directory")


def test_unwritable_output_fails_before_the_work(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()

    def denied(*a, **k):  # what mkdtemp raises in a read-only directory (root ignores chmod, so simulate)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
    monkeypatch.setattr(output_dir.tempfile, "mkdtemp", denied)
    rc, _, err = run(["quantize", STORIES, "-o", ro / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, f"cannot write to {ro}: Permission denied")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", full)
    rc, _, err = run(["quantize", STORIES, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "No space left on device")
    # nothing but the finished blocks, which the message points at (--resume saves again without redoing them)
    assert [p.name for p in tmp_path.iterdir()] == [".q.partial"] and "--resume continues" in err


@pytest.mark.parametrize("content", ["café olé naïve déjà vu. ".encode("latin-1") * 50, bytes(range(256)) * 8,
                                     b"\x00\x01binary\x00" * 100], ids=["latin1", "binary", "nul"])
@pytest.mark.parametrize("flag", ["--text", "--calib"])
def test_non_utf8_text_is_one_line(flag, content, tmp_path, story, monkeypatch, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
    files = {"--text": bad, "--calib": story} | {flag: bad}
    rc, _, err = run(["eval", STORIES, "--text", files["--text"], "--calib", files["--calib"], "--presets",
                      "w8a8", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, f"{bad}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
    rc, _, err = run(["quantize", STORIES, "-o", tmp_path / "q", "--device", "cuda"], capsys)
    assert_one_line_error(rc, err, "device cuda: no CUDA GPU is available here")


# ---------------------------------------------------------------- 6. options that mislead


@pytest.mark.parametrize("args", [
    ["eval", STORIES, "--text", "t.txt", "--seq-len", "0"],
    ["eval", STORIES, "--text", "t.txt", "--max-tokens", "-5"],
    ["eval", STORIES, "--text", "t.txt", "--calib-samples", "0"],
    ["quantize", STORIES, "-o", "q", "--lkd", "--lkd-steps", "-1"],
    ["quantize", STORIES, "-o", "q", "--lkd", "--lkd-lr", "0"],
    ["quantize", STORIES, "-o", "q", "--lkd", "--lkd-weight-lr=-1e-5"],
    ["quantize", STORIES, "-o", "q", "--seed", "-1"],
    ["quantize", STORIES, "-o", "q", "--seed", str(2**70)],
])
def test_numeric_options_are_range_checked(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_errors_are_builtin_kinds_too():
    """Callers can catch the matching builtin: bad values are ValueErrors, unusable paths OSErrors."""
    with pytest.raises(ValueError, match="unknown preset|preset"):
        resolve_config("w5a5")
    with pytest.raises(OSError, match="not found") as e:
        zq.load_fp_model("/nonexistent/model")
    assert isinstance(e.value, zq.PathError) and isinstance(e.value, zq.ZeroQuantError)


def test_quantizing_a_quantized_or_unloaded_model_is_refused():
    model, _ = zq.load_fp_model(STORIES)
    q = zq.quantize(model, "w8a16", progress=False)
    with pytest.raises(zq.ZeroQuantError, match="already quantized"):
        zq.quantize(q, "w4a16", progress=False)
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(zq.ZeroQuantError, match="meta device"):
        zq.quantize(empty, "w8a16", progress=False)


def test_round_to_nearest_needs_no_tokenizer(fp, tmp_path, capsys):
    for f in fp.glob("tokenizer*"):
        f.unlink()
    rc, so, err = run(["quantize", fp, "--preset", "w8a16", "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert (tmp_path / "q" / "quantization.json").exists()


def test_missing_tokenizer_fails_before_the_weights_when_data_is_needed(fp, tmp_path, monkeypatch, capsys):
    for f in fp.glob("tokenizer*"):
        f.unlink()
    monkeypatch.setattr("transformers.LlamaForCausalLM.from_pretrained", _no_load)
    rc, _, err = run(["quantize", fp, "--preset", "w4a16+gptq", "-o", tmp_path / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "cannot load the tokenizer")


# ---------------------------------------------------------------- 7. leftovers and modes


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_save_cleans_up(sig, tmp_path, monkeypatch, capsys):
    real = checkpoint.save_model

    def killed(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(checkpoint, "save_model", killed)
    # whatever the process did with the signal before (a library may ignore SIGINT), the CLI interrupts
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        rc, _, err = run(["quantize", STORIES, "-o", tmp_path / "q", "--device", "cpu"], capsys)
    finally:
        assert signal.signal(sig, previous) == signal.SIG_IGN  # and put the ignoring handler back
    assert rc == 130 and last_line(err) == f"zeroquant: interrupted ({sig.name})"
    assert [p.name for p in tmp_path.iterdir()] == [".q.partial"] and "--resume continues" in err
    assert signal.getsignal(signal.SIGTERM) is not _raise_interrupt  # main put the previous handler back


def test_stale_temp_dirs_of_dead_saves_are_removed(q4_saved, tmp_path):
    dead = tmp_path / ".q.tmp-999999999-abcd_123"  # no such pid
    old_style = tmp_path / ".q.tmp-k2j4h5g6"  # mkdtemp's name before the pid was in it
    old_swap = tmp_path / ".q.old-999999999"
    live = tmp_path / f".q.tmp-{os.getppid()}-efgh4567"  # a running process's save
    users = tmp_path / ".q.tmp-notes"  # not a name a save gives
    for d in (dead, old_style, old_swap, live, users):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    zq.save_quantized(zq.load_quantized(q4_saved, fuse=False), tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, users.name, "q"])


def test_saved_files_follow_the_umask(q4_saved, tmp_path):
    old = os.umask(0o022)
    try:
        out = zq.save_quantized(zq.load_quantized(q4_saved, fuse=False), tmp_path / "q")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}


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
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
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
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", _no_load)
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
