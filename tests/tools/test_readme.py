"""The README's quick start runs as written, on the real stories260K (a tiny trained Llama), on CPU.

The Python block and the shell block marked `<!-- quickstart: ... -->` in README.md are extracted; the model
path and the text files they name are swapped for stories260K and small wikitext-2 excerpts, and every line
runs in a temporary directory.
"""

import re
import shlex
from pathlib import Path

import pytest
from conftest import ASSETS, missing_asset

ROOT = Path(__file__).resolve().parents[2]
STORIES = ASSETS / "stories260K"
WIKI = ASSETS / "wikitext-2"


def quickstart_block(kind: str) -> str:
    """The fenced block right after `<!-- quickstart: kind -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- quickstart: {kind} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked <!-- quickstart: {kind} -->"
    return m.group(1)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    if not STORIES.is_dir() or not WIKI.is_dir():
        missing_asset(f"the shared assets {STORIES} and {WIKI}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # small real text: calibration from valid.txt, evaluation from test.txt
    (tmp_path / "valid.txt").write_text((WIKI / "valid.txt").read_text()[:20000])
    (tmp_path / "test.txt").write_text((WIKI / "test.txt").read_text()[:8000])
    return tmp_path


def test_readme_python_quick_start(workdir):
    code = quickstart_block("python")
    assert len(code.strip().splitlines()) <= 12, "the quick start should stay about ten lines"
    assert "path/to/model" in code
    code = code.replace("path/to/model", str(STORIES))
    scope: dict = {}
    exec(compile(code, "README.md quick start", "exec"), scope)
    import zeroquant as zq

    assert zq.quantized_modules(scope["qmodel"]) and zq.quantized_modules(scope["q4"])
    assert (workdir / "out" / "w8a8" / "quantization.json").is_file()


def test_readme_cli_quick_start(workdir, capsys):
    from zeroquant.tools.cli import main

    lines = [ln.split("#")[0].strip() for ln in quickstart_block("cli").splitlines()]
    lines = [ln for ln in lines if ln]
    assert lines and all(ln.startswith("zeroquant ") for ln in lines), lines
    for line in lines:
        argv = [str(STORIES) if a == "path/to/model" else a for a in shlex.split(line)[1:]]
        assert main(argv) == 0, f"README.md: `{line}` failed: {capsys.readouterr().err}"
    assert (workdir / "out" / "ct" / "config.json").is_file()
