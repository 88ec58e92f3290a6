"""Hostile but realistic inputs to the CLI (issue 41): nothing a user owns is lost, no random weights with exit
0, every error is one line with exit status 2, and nothing is left behind. The models are stories260K (a real
tiny Llama) and copies of it with one thing wrong."""

import json
import os
import signal

import pytest
import torch
import transformers
from conftest import missing_asset
from hostile_cases import STORIES, assert_one_line_error, last_line, no_load, run
from safetensors.torch import load_file, save_file

import zeroquant as zq
from zeroquant.core.config import resolve_config
from zeroquant.formats import checkpoint, output_dir
from zeroquant.tools.cli import _raise_interrupt, main

pytest_plugins = ["hostile_cases"]


@pytest.fixture(autouse=True)
def _needs_stories():
    if not STORIES.exists():
        missing_asset("../shared/assets/stories260K")


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


def test_output_under_a_file_fails_before_the_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
    rc, _, err = run(["quantize", STORIES, "-o", tmp_path / "afile" / "q", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, "is a file, not a directory")


def test_unwritable_output_fails_before_the_work(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()

    def denied(*a, **k):  # what mkdtemp raises in a read-only directory (root ignores chmod, so simulate)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
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
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
    files = {"--text": bad, "--calib": story} | {flag: bad}
    rc, _, err = run(["eval", STORIES, "--text", files["--text"], "--calib", files["--calib"], "--presets",
                      "w8a8", "--device", "cpu"], capsys)
    assert_one_line_error(rc, err, f"{bad}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("zeroquant.tools.commands.load_fp_model", no_load)
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
    monkeypatch.setattr("transformers.LlamaForCausalLM.from_pretrained", no_load)
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


