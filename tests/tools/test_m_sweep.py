"""bench/m_sweep.py's tables: speed-ups as tokens/s over FP16's, times to the first token as FP16's time over
the preset's, and neither table reads the other's points."""

import importlib.util
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[2] / "bench" / "m_sweep.py"


@pytest.fixture(scope="module")
def m_sweep():
    spec = importlib.util.spec_from_file_location("m_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


POINTS = [
    {"preset": "fp16", "m": 64, "batch": 64, "prompt_len": 128, "decode": True, "tok_s": 1000.0, "ttft_ms": 9.0},
    {"preset": "w8a8", "m": 64, "batch": 64, "prompt_len": 128, "decode": True, "tok_s": 1500.0, "ttft_ms": 6.0},
    {"preset": "fp16", "kind": "ttft", "m": 2048, "ttft_ms": 12.0},
    {"preset": "w8a8", "kind": "ttft", "m": 2048, "ttft_ms": 8.0},
    {"preset": "w4a16", "kind": "ttft", "m": 2048, "ttft_ms": 16.0},
]


def test_points_decode_up_to_64_tokens_then_prompts_of_at_most_2048(m_sweep):
    assert m_sweep.point(64) == (64, 128, 32)
    assert m_sweep.point(1024) == (1, 1024, 0)
    assert m_sweep.point(8192) == (4, 2048, 0)


def test_tables_keep_sweep_and_first_token_points_apart(m_sweep):
    sweep = m_sweep.table(POINTS, ["w8a8", "w4a16"], [64])
    assert "| 64 | decode b64 | 1,000 | 1.50 | - |" in sweep
    assert "2048" not in sweep
    ttft = m_sweep.ttft_table(POINTS, ["w8a8", "w4a16"])
    assert "| 2048 | 12.00 | 8.00 (1.50x) | 16.00 (0.75x) |" in ttft
    assert "| 64 " not in ttft


def test_replot_writes_both_tables(m_sweep, tmp_path):
    meta = {"config": "llama-7b", "layers": 8, "device": "cpu", "torch": "x", "command": "python bench/m_sweep.py"}
    m_sweep.report(POINTS, ["w8a8", "w4a16"], meta, tmp_path / "s")
    text = (tmp_path / "s.md").read_text()
    assert "python bench/m_sweep.py" in text and "decode b64" in text and "8.00 (1.50x)" in text
