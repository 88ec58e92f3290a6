"""FP vs each preset on the same text, one table."""

from __future__ import annotations

from torch import nn

from .api import quantize
from .config import resolve_config
from .evaluate import EvalSettings, evaluate_model, format_table, is_causal_lm


def report(
    model: nn.Module,
    tokenizer,
    text: str,
    presets: list[str],
    calib_texts: list[str] | None = None,
    settings: EvalSettings | None = None,
    allow_generic: bool = False,
) -> list[dict]:
    """Evaluate the FP model and each preset; returns rows (print them with format_table)."""
    settings = settings or EvalSettings()
    configs = [resolve_config(p) for p in presets]  # fail on a bad name before any work
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    ref = {"scheme": dtype, **evaluate_model(model, tokenizer, text, settings)}
    rows = [ref]
    for cfg in configs:
        needs = cfg.needs_calibration
        q = quantize(model, cfg, calib_data=calib_texts if needs else None, tokenizer=tokenizer,
                     allow_generic=allow_generic, progress=settings.progress)
        rows.append({"scheme": cfg.name, **evaluate_model(q, tokenizer, text, settings, reference=ref)})
        del q
    if is_causal_lm(model):
        for r in rows:
            r["ppl_vs_fp"] = r["ppl"] / ref["ppl"]
    return rows


def print_report(rows: list[dict]) -> str:
    table = format_table(rows)
    print(table)
    return table
