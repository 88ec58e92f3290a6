"""How a checkpoint was made, recorded in its quantization.json: the zeroquant version, the preset and options,
the calibration / distillation data (source, sha256, tokens read), the seed and the number of processes.
Nothing in it varies between identical runs (no times, dates or absolute paths), so reruns stay
byte-identical."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata

import torch


def version() -> str:
    """The installed zeroquant's version (pyproject.toml's), or "unknown" when run from an uninstalled tree."""
    try:
        return metadata.version("zeroquant-ptq")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_record(source: str | None, data) -> dict | None:
    """What a run read as calibration or distillation data: `source` is a file path, "self" or "random";
    `data` the batches (or texts) made from it. None when the run read none."""
    if data is None:
        return None
    rec: dict = {"source": source if source in (None, "self", "random") else os.path.basename(source)}
    if source not in (None, "self", "random") and os.path.isfile(source):
        rec["sha256"] = file_sha256(source)
    if all(isinstance(d, str) for d in data):
        rec["texts"] = len(data)
        return rec
    ids = [b["input_ids"] if isinstance(b, dict) else b for b in data]
    masks = [b.get("attention_mask") if isinstance(b, dict) else None for b in data]
    rec["sequences"] = sum(int(t.shape[0]) if t.dim() > 1 else 1 for t in ids)
    rec["tokens"] = sum(int(m.sum()) if isinstance(m, torch.Tensor) else t.numel()
                        for t, m in zip(ids, masks, strict=True))
    return rec


def describe(p: dict) -> list[str]:
    """Lines for `zeroquant info`."""
    out = [f"made by:       zeroquant {p.get('zeroquant', '?')}, {p.get('processes', 1)} process(es), "
           f"seed {p.get('seed')}"]
    if p.get("model"):
        out.append(f"from model:    {p['model']}")
    opts = {k: v for k, v in (p.get("options") or {}).items() if v not in (None, False)}
    if opts:
        out.append("options:       " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    d = p.get("data")
    if d:
        size = (f"{d['sequences']} sequences, {d['tokens']:,} tokens" if "tokens" in d else f"{d.get('texts')} texts")
        sha = f", sha256 {d['sha256'][:16]}…" if d.get("sha256") else ""
        out.append(f"data:          {d['source']} ({size}{sha})")
    if p.get("lkd"):
        c = p["lkd"]
        out.append(f"LKD:           {c.get('steps')} steps a block, inputs {c.get('inputs')}, trains {c.get('train')}")
    return out
