"""The peer row: llm-compressor's GPTQ W4A16 (`oneshot` + GPTQModifier) beside zeroquant's W4A16 rows, on the
same model, calibration windows and evaluation text, in one CPU process.

llm-compressor pins its own transformers / compressed-tensors versions, so it runs in a virtual environment
of its own with zeroquant installed beside it without dependencies:

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor torch==2.13.0 gguf accelerate datasets
    /tmp/llmc/bin/pip install --no-deps -e .
    /tmp/llmc/bin/python bench/peer_llmcompressor.py --model SMOL.gguf --text ../shared/assets/wikitext-2/test.txt \
        --calib ../shared/assets/wikitext-2/valid.txt --max-tokens 16384 --out bench/results/peer_llmcompressor

Both GPTQs see the same 128 x 128-token windows of the calibration text (zeroquant.lkd_batches, seed 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.tools.evaluate import perplexity, read_text


def llmcompressor_gptq(model, tok, windows: torch.Tensor, scheme: str | int, bypass: bool = False) -> torch.nn.Module:
    """scheme: a preset name ("W4A16": symmetric INT4 in groups of 128) or a group size for symmetric INT4."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    # llm-compressor re-reads the config and processor from the model's path; a GGUF model's path is the
    # package folder, so give it a directory of its own that holds both
    d = tempfile.mkdtemp(prefix="smol-config-")
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    model.config._name_or_path = model.name_or_path = d
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    if isinstance(scheme, int):
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": scheme}
        recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    else:
        recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], bypass_divisibility_checks=bypass)
    return oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, max_seq_length=windows.shape[1],
                   num_calibration_samples=windows.shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import llmcompressor
    import transformers

    torch.manual_seed(0)
    model, tok = zq.load_fp_model(args.model, "cpu")
    text = read_text(args.text)
    batches = lkd_batches(args.calib, model, tok, 128, 128, seed=0)
    windows = torch.cat([b["input_ids"] for b in batches])
    # compressed-tensors' W4A16: symmetric INT4, groups of 128; zeroquant's w4a16 is asymmetric
    w4sym = zq.QuantConfig(attention=zq.LinearRule(zq.WeightQuant(4, 128, True)),
                           mlp=zq.LinearRule(zq.WeightQuant(4, 128, True)), name="w4a16-sym")
    gptq_sym = zq.QuantConfig(attention=zq.LinearRule(zq.WeightQuant(4, 128, True), rounding="gptq"),
                              mlp=zq.LinearRule(zq.WeightQuant(4, 128, True), rounding="gptq"),
                              name="w4a16-sym+gptq")
    out = Path(args.out)
    old = out.with_suffix(".json")
    # rows of an earlier run that did not fail are kept (the CPU evaluations take minutes each)
    rows = {k: r for k, r in json.loads(old.read_text())["rows"].items() if "error" not in r} if old.exists() else {}
    meta = {"model": args.model, "text": args.text, "calib": f"{args.calib}: 128 x 128-token windows",
            "max_tokens": args.max_tokens, "seq_len": args.seq_len, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__}

    def record(name: str, make) -> None:
        if name in rows:
            return
        t0 = time.perf_counter()
        try:
            m = make()
            t1 = time.perf_counter()
            r = perplexity(m, tok, text, args.seq_len, args.max_tokens, 1, progress=False)
            rows[name] = {"ppl": r["ppl"], "tokens": r["tokens"], "quant_min": (t1 - t0) / 60}
        except Exception as e:  # noqa: BLE001 - the failure is the row's result
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        print(name, rows[name], flush=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    record("fp32", lambda: model)
    for cfg in ("w4a16", "w4a16+gptq", w4sym, gptq_sym):
        record(cfg if isinstance(cfg, str) else cfg.name,
               lambda cfg=cfg: zq.quantize(model, cfg, calib_data=batches, tokenizer=tok, progress=False))
    # By default llm-compressor refuses layers whose input size its group size does not divide (SmolLM2's 576);
    # its own escape hatch runs them anyway
    record("llm-compressor GPTQ W4A16", lambda: llmcompressor_gptq(copy.deepcopy(model), tok, windows, "W4A16", False))
    record("llm-compressor GPTQ W4A16, bypass_divisibility_checks",
           lambda: llmcompressor_gptq(copy.deepcopy(model), tok, windows, "W4A16", True))
    # groups of 64 divide every SmolLM2 layer: the peer's GPTQ runs, beside ours at the same format
    for sym in (True, False):
        cfg = zq.QuantConfig(attention=zq.LinearRule(zq.WeightQuant(4, 64, sym), rounding="gptq"),
                             mlp=zq.LinearRule(zq.WeightQuant(4, 64, sym), rounding="gptq"),
                             name=f"w4a16-g64{'-sym' if sym else ''}+gptq")
        record(cfg.name, lambda cfg=cfg: zq.quantize(model, cfg, calib_data=batches, tokenizer=tok, progress=False))
    record("llm-compressor GPTQ W4A16 g64 (sym)", lambda: llmcompressor_gptq(copy.deepcopy(model), tok, windows, 64))
    fp = rows["fp32"]["ppl"]
    lines = [f"{meta['model']} on {meta['text']} (first {args.max_tokens} tokens, {args.seq_len}-token windows), CPU, "
             f"torch {meta['torch']}, transformers {meta['transformers']}, llm-compressor {meta['llmcompressor']}",
             "", "| scheme | perplexity | vs FP | quantize min |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['error']} | | |" if "error" in r else
                     f"| {name} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f}x | {r['quant_min']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
