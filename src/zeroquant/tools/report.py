"""FP vs each preset on the same text, one table."""

from __future__ import annotations

import time

from torch import nn

from zeroquant.api import check_config, quantize
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.hf import is_causal_lm
from zeroquant.tools.evaluate import EvalSettings, evaluate_model, format_table


def report(
    model: nn.Module,
    tokenizer,
    text: str,
    presets: list[str],
    calib_data=None,
    settings: EvalSettings | None = None,
    allow_generic: bool = False,
) -> list[dict]:
    """Evaluate the FP model and each preset; returns rows (print them with format_table).

    Every preset is checked against the model before any work, so a bad name or an unquantizable layer fails
    at once; a preset that fails later keeps its error in its row ("error") and the other rows complete.
    """
    settings = settings or EvalSettings()
    configs = [check_config(model, p, allow_generic) for p in presets]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    ref = {"scheme": dtype, **evaluate_model(model, tokenizer, text, settings)}
    ref["eval_min"] = (time.perf_counter() - t0) / 60
    rows = [ref]
    for cfg in configs:
        t0 = time.perf_counter()
        try:
            q = quantize(model, cfg, calib_data=calib_data if cfg.needs_data else None, tokenizer=tokenizer,
                         allow_generic=allow_generic, progress=settings.progress)
            t1 = time.perf_counter()
            row = {"scheme": cfg.name, **evaluate_model(q, tokenizer, text, settings, reference=ref)}
            row.update(quant_min=(t1 - t0) / 60, eval_min=(time.perf_counter() - t1) / 60)
            del q
        except (ZeroQuantError, RuntimeError, ValueError) as e:
            row = {"scheme": cfg.name, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        rows.append(row)
    if is_causal_lm(model):
        for r in rows:
            if "ppl" in r:
                r["ppl_vs_fp"] = r["ppl"] / ref["ppl"]
    return rows


def verdict(row: dict, ref: dict) -> str:
    """One line a person reads: how much smaller the weights are and what it cost in accuracy."""
    if "error" in row:
        return f"{row['scheme']}: failed ({row['error']})"
    size = ref["weights_mb"] / row["weights_mb"] if row.get("weights_mb") else None
    smaller = f"{size:.1f}x smaller weights" if size else "weights"
    if "ppl" in row:
        change = (row["ppl"] / ref["ppl"] - 1) * 100
        word = "close to" if abs(change) < 1 else "worse than" if change > 0 else "better than"
        return (f"{row['scheme']}: {smaller}, perplexity {row['ppl']:.2f} vs {ref['ppl']:.2f} "
                f"({change:+.1f}%, {word} {ref['scheme']})")
    if "cos_mean" in row:
        cos = row["cos_mean"]
        word = "indistinguishable" if cos >= 0.999 else "close" if cos >= 0.99 else "noticeably off"
        return f"{row['scheme']}: {smaller}, embeddings {cos:.4f} cosine to {ref['scheme']}'s ({word})"
    return f"{row['scheme']}: {smaller}"


def print_report(rows: list[dict]) -> str:
    """The table, then a verdict line per quantized row."""
    table = format_table(rows)
    lines = [verdict(r, rows[0]) for r in rows[1:]]
    text = table + ("\n\n" + "\n".join(lines) if lines else "")
    print(text)
    return text
