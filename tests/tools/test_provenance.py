"""quantization.json records how a checkpoint was made, identically for identical runs; `info` prints it."""

import hashlib
import json

import torch
from test_hostile_inputs import STORIES, run

import zeroquant as zq
from zeroquant.formats.provenance import data_record


def test_data_record_counts_what_was_read(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("some text")
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    batches = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": mask},
               {"input_ids": torch.ones(1, 5, dtype=torch.long)}]
    rec = data_record(str(f), batches)
    assert rec == {"source": "calib.txt", "sha256": hashlib.sha256(b"some text").hexdigest(), "sequences": 3,
                   "tokens": 12}
    assert data_record("self", ["a", "b"]) == {"source": "self", "texts": 2}
    assert data_record(None, None) is None


def test_cli_records_and_info_prints_provenance(tmp_path, capsys):
    calib = tmp_path / "c.txt"
    calib.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 60)
    args = ["quantize", STORIES, "--preset", "w4a16", "--gptq", "--calib", calib, "--calib-samples", "4",
            "--device", "cpu", "--seed", "7"]
    assert run([*args, "-o", tmp_path / "a"], capsys)[0] == 0
    assert run([*args, "-o", tmp_path / "b"], capsys)[0] == 0
    a, b = ((tmp_path / d / "quantization.json").read_text() for d in "ab")
    assert a == b  # nothing in it varies between identical runs
    p = json.loads(a)["provenance"]
    assert p["zeroquant"] == zq.__version__ and p["seed"] == 7 and p["processes"] == 1 and p["model"] == "stories260K"
    assert p["data"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest() and p["data"]["sequences"] == 4
    rc, out, _ = run(["info", tmp_path / "a"], capsys)
    assert rc == 0 and "made by:       zeroquant" in out and "c.txt (4 sequences" in out and "gptq=True" in out


def test_identical_cli_runs_write_identical_files(tmp_path, capsys):
    """RTN, +gptq --calib and --lkd: two runs, the same bytes in every file (sha256 identifies a checkpoint)."""
    calib = tmp_path / "c.txt"
    calib.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 60)
    variants = {"rtn": ["--preset", "w4a16"], "gptq": ["--preset", "w4a16", "--gptq", "--calib", calib],
                "lkd": ["--preset", "w4/8-a8", "--lkd", "--lkd-data", calib, "--lkd-steps", "5", "--lkd-samples",
                        "4", "--lkd-seq-len", "64"]}
    for name, args in variants.items():
        outs = [tmp_path / f"{name}{i}" for i in range(2)]
        for out in outs:
            assert run(["quantize", STORIES, *args, "-o", out, "--device", "cpu"], capsys)[0] == 0
        files = sorted(f.name for f in outs[0].iterdir())
        assert files == sorted(f.name for f in outs[1].iterdir()) and "model.safetensors" in files
        for f in files:
            assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), (name, f)
