"""Shared by the hostile-input tests: stories260K (a real tiny Llama) as the model, the CLI run in-process,
the one-line-error check, and fixtures that copy the model or a w4a16 checkpoint of it for a test to damage.
The test modules load the fixtures with `pytest_plugins`."""

import re
import shutil

import pytest
from conftest import ASSETS

import zeroquant as zq
from zeroquant.tools.cli import main

STORIES = ASSETS / "stories260K"


STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 40


def run(args, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def no_load(*a, **k):
    """Stands in for the model loader where a check must come before any loading."""
    raise AssertionError("the model was loaded before the check")


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


