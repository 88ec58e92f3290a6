"""quantization.json records how a checkpoint was made, identically for identical runs; `info` prints it."""

import hashlib
import json

import torch
from test_hostile_inputs import STORIES, run

import zeroquant as zq
from zeroquant.provenance import data_record


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
