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


def test_a_run_killed_after_two_blocks_resumes_to_the_same_checkpoint(tmp_path, capsys, monkeypatch):
    """stories260K (5 blocks), GPTQ and LKD: a run killed while quantizing its third block, then the same command
    with --resume, writes the files an uninterrupted run writes; the finished blocks are not quantized again."""
    from zeroquant.algorithms import block_store
    from zeroquant.algorithms.block_store import BlockStore

    calib = tmp_path / "c.txt"
    calib.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 60)
    variants = {"gptq": ["--preset", "w4/8-a8+gptq", "--calib", calib, "--calib-samples", "4"],
                "lkd": ["--preset", "w4/8-a8+smooth", "--lkd", "--lkd-data", calib, "--lkd-steps", "4",
                        "--lkd-samples", "4", "--lkd-seq-len", "64"]}
    real_save = BlockStore.save
    for name, args in variants.items():
        whole, killed = tmp_path / f"{name}-whole", tmp_path / f"{name}-killed"
        assert run(["quantize", STORIES, *args, "-o", whole, "--device", "cpu"], capsys)[0] == 0

        def dies(self, k, block, record):
            if k == 2:
                raise KeyboardInterrupt("killed")
            real_save(self, k, block, record)

        monkeypatch.setattr(BlockStore, "save", dies)
        assert run(["quantize", STORIES, *args, "-o", killed, "--device", "cpu"], capsys)[0] == 130
        partial = block_store.store_dir(killed)
        assert sorted(f.name for f in partial.iterdir()) == ["block-00000.safetensors", "block-00001.safetensors",
                                                              "run.json"] and not killed.exists()
        saved = []

        def counts(self, k, block, record, saved=saved):
            saved.append(k)
            real_save(self, k, block, record)

        monkeypatch.setattr(BlockStore, "save", counts)
        rc, out, _ = run(["quantize", STORIES, *args, "-o", killed, "--device", "cpu", "--resume"], capsys)
        assert rc == 0 and "resuming: 2 finished block(s)" in out and saved == [2, 3, 4]
        assert not partial.exists()
        files = sorted(f.name for f in whole.iterdir())
        assert files == sorted(f.name for f in killed.iterdir())
        for f in files:
            assert (whole / f).read_bytes() == (killed / f).read_bytes(), (name, f)
        monkeypatch.setattr(BlockStore, "save", real_save)


def test_resume_refuses_a_run_with_other_settings(tmp_path, capsys):
    from zeroquant.algorithms.block_store import store_dir

    out = tmp_path / "q"
    store_dir(out).mkdir()
    (store_dir(out) / "run.json").write_text("{}")
    rc, _, err = run(["quantize", STORIES, "--preset", "w4a16", "-o", out, "--resume"], capsys)
    assert rc == 2 and "holds a run with other settings" in err
