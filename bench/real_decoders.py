"""Paper-style accuracy table on a real decoder: perplexity of the FP model and of every scheme, each INT4
preset with round-to-nearest, + LKD (text / self-generated / random data), + GPTQ and + GPTQ + LKD.

    # SmolLM2-135M on the GPU, full wikitext-2 test set, calibration and LKD text from valid.txt
    python bench/real_decoders.py --model SMOL.gguf --text ../shared/assets/wikitext-2/test.txt \
        --calib ../shared/assets/wikitext-2/valid.txt --out bench/results/smollm2_wikitext2
    # stories260K on the CPU, on text it wrote itself (its tokenizer does not cover wikitext)
    python bench/real_decoders.py --model ../shared/assets/stories260K --self-text 64 \
        --out bench/results/stories260k_self --seq-len 256

Writes OUT.json after every row (with --resume FILE, rows already in FILE are kept, not re-run) and OUT.md
at the end. Gap recovered = (ppl_rtn - ppl) / (ppl_rtn - ppl_fp) against the same preset's RTN row.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.tools.evaluate import perplexity, read_text

INT4 = ["w4a16", "w4/8-a16", "w4/8-a8"]
METHODS = ["rtn", "gptq-128", "gptq", "autoround", "lkd-text", "lkd-self", "gptq+lkd-text", "gptq+lkd-self"]
ROWS = ([("fp", "-"), ("w8a8-static", "rtn"), ("w8a8", "rtn")] + [(p, m) for p in INT4 for m in METHODS]
        + [("rtn-w4", "rtn")])
# --ablation: LKD (text) with every input stream and every set of trained values, per INT4 preset
ABLATION = [f"lkd-text:{i}/{t}" for i in ("fp", "quantized", "mixed") for t in ("rounding", "weights", "all")]


def parse_method(method: str) -> tuple[bool, str | None, dict]:
    """'gptq+lkd-text:fp/weights' -> (GPTQ rounding?, LKD data kind or None, LKDConfig overrides)."""
    gptq = method.startswith("gptq")
    lkd = method.split("+")[-1] if "lkd" in method else None
    if lkd is None:
        return gptq, None, {}
    kind, _, variant = lkd.removeprefix("lkd-").partition(":")
    over = dict(zip(("inputs", "train"), variant.split("/"), strict=True)) if variant else {}
    return gptq, kind, over


def row_key(preset: str, method: str) -> str:
    return f"{preset} {method}"


def self_text(model, tok, n: int, seq_len: int, seed: int) -> str:
    """Text the FP model writes itself, decoded: evaluation text for a model whose tokenizer does not cover
    wikitext (a seed apart from the LKD data's)."""
    ids = torch.cat([b["input_ids"] for b in lkd_batches("self", model, tok, n, seq_len, seed=seed)])
    return "\n".join(tok.decode(r, skip_special_tokens=True) for r in ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or .gguf file")
    p.add_argument("--text", help="evaluation text file")
    p.add_argument("--self-text", type=int, metavar="N", help="evaluate on N sequences the model writes itself")
    p.add_argument("--calib", help="text file for calibration, GPTQ and LKD 'text' (default: self-written text)")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--max-tokens", type=int, help="cap on evaluated tokens (default: the whole text)")
    p.add_argument("--batch", type=int, default=4, help="perplexity windows per forward")
    p.add_argument("--samples", type=int, default=128, help="calibration / LKD sequences (default 128)")
    p.add_argument("--data-len", type=int, default=2048, help="calibration / LKD sequence length (default 2048)")
    p.add_argument("--gptq-len", type=int, help="'gptq' rows: calibration sequence length (default: --data-len; "
                   "'gptq-128' rows: 128, as GPTQ's earlier rows here)")
    p.add_argument("--lkd-steps", type=int, default=200)
    p.add_argument("--lkd-inputs", default="quantized")
    p.add_argument("--lkd-train", default="rounding")
    p.add_argument("--rows", help="comma-separated 'preset method' keys to run (default: all); a method "
                   "'lkd-self~T/P/L' is LKD on self-written text sampled at temperature T, top_p P, sequences of "
                   "L tokens (as many tokens in all as the default data)")
    p.add_argument("--presets", help="comma-separated presets whose rows run (default: all)")
    p.add_argument("--ablation", action="store_true", help="also LKD (text) with each input stream and trained set")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", help="JSON of an earlier run: its rows are kept and not re-run")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md")
    args = p.parse_args()
    if (args.text is None) == (args.self_text is None):
        p.error("give exactly one of --text and --self-text")

    t0 = time.perf_counter()
    model, tok = zq.load_fp_model(args.model, args.device)
    load_s = time.perf_counter() - t0
    text = read_text(args.text) if args.text else self_text(model, tok, args.self_text, args.seq_len, seed=1234)
    sources = {"text": args.calib or "self", "self": "self", "random": "random"}
    made: dict[str, list] = {}

    data_min: dict[str, float] = {}

    def data(kind: str, length: int) -> list:  # made on first use: self-written text takes a while
        if (kind, length) not in made:
            t = time.perf_counter()
            if kind.startswith("self~"):  # sampling sweep: as many tokens as the default, other settings
                temp, top_p, seq = (float(v) for v in kind.removeprefix("self~").split("/"))
                n = args.samples * length // int(seq)
                made[kind, length] = lkd_batches("self", model, tok, n, int(seq), seed=0, temperature=temp,
                                                 top_p=top_p)
            else:
                made[kind, length] = lkd_batches(sources[kind], model, tok, args.samples, length, seed=0)
            data_min[f"{kind} x {length}"] = (time.perf_counter() - t) / 60
        return made[kind, length]

    lkd = zq.LKDConfig(steps=args.lkd_steps, inputs=args.lkd_inputs, train=args.lkd_train)

    meta = {"model": str(args.model), "text": args.text or f"self-written, {args.self_text} sequences",
            "calib": args.calib or "self-written", "seq_len": args.seq_len, "samples": args.samples,
            "data_len": args.data_len, "gptq_len": args.gptq_len, "lkd": asdict(lkd), "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "load_s": load_s, "data_min": data_min}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows: dict[str, dict] = {}
    if args.resume and Path(args.resume).exists():
        rows = {r["key"]: r for r in json.loads(Path(args.resume).read_text())["rows"]}
    wanted = set(args.rows.split(",")) if args.rows else None
    presets = set(args.presets.split(",")) if args.presets else None
    plan = ROWS + ([(p, m) for p in INT4 for m in ABLATION] if args.ablation else [])
    plan += [tuple(k.split(" ", 1)) for k in sorted(wanted or ()) if tuple(k.split(" ", 1)) not in plan]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2))

    for preset, method in plan:
        key = row_key(preset, method)
        skip = (wanted is not None and key not in wanted) or (presets is not None and preset not in presets | {"fp"})
        if key in rows or skip or method == "autoround":  # the AutoRound row: bench/peer_autoround.py --merge
            continue
        t0 = time.perf_counter()
        row = {"key": key, "preset": preset, "method": method}
        try:
            if preset == "fp":
                q = model
            else:
                gptq, kind, over = parse_method(method)
                cfg = None if kind is None else replace(lkd, **over)
                length = args.data_len if kind else 128 if method == "gptq-128" else (args.gptq_len or args.data_len)
                calib = data(kind or "text", length)
                t0 = time.perf_counter()  # the data's own time is in meta["data_min"]
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                q = zq.quantize(model, preset + ("+gptq" if gptq else ""), calib_data=calib, tokenizer=tok,
                                lkd=cfg, progress=False)
                if cfg is not None:
                    row["lkd"] = {"inputs": cfg.inputs, "train": cfg.train,
                                  "held_apart_recovered": sum(r["recovered"] for r in q.zeroquant.lkd)
                                  / len(q.zeroquant.lkd)}
            t1 = time.perf_counter()
            r = perplexity(q, tok, text, args.seq_len, args.max_tokens, args.batch, progress=False)
            row.update(ppl=r["ppl"], tokens=r["tokens"], quant_min=(t1 - t0) / 60,
                       eval_min=(time.perf_counter() - t1) / 60)
            if args.device.startswith("cuda"):
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if q is not model:
                del q
        except Exception as e:  # noqa: BLE001 - a failed row keeps its error; the others still run
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        rows[key] = row
        print(json.dumps(row), flush=True)
        save()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    save()
    out.with_suffix(".md").write_text(markdown(meta, list(rows.values())) + "\n")
    print(markdown(meta, list(rows.values())))


def markdown(meta: dict, rows: list[dict]) -> str:
    by = {r["key"]: r for r in rows}
    fp = by.get(row_key("fp", "-"), {}).get("ppl")
    lines = [f"model {meta['model']}, text {meta['text']}, {meta['device_name']} ({meta['device']}), torch "
             f"{meta['torch']}; calibration / LKD data: {meta['samples']} x {meta['data_len']} tokens "
             f"(text = {meta['calib']}); LKD {meta['lkd']['steps']} steps/block, inputs {meta['lkd']['inputs']}, "
             f"trains {meta['lkd']['train']} (rows marked :inputs/train differ)",
             "", "| scheme | rounding / LKD data | perplexity | vs FP | gap recovered | tokens | quantize min | "
             "eval min |", "|---|---|---|---|---|---|---|---|"]
    order = ROWS + [(p, m) for p in INT4 for m in ABLATION]
    for r in sorted(rows, key=lambda r: order.index((r["preset"], r["method"])) if (r["preset"], r["method"])
                    in order else len(order)):
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['method']} | {r['error']} | | | | | |")
            continue
        rtn = by.get(row_key(r["preset"], "rtn"), {}).get("ppl")
        gap = ""
        if r["method"] != "rtn" and rtn is not None and fp is not None and rtn > fp:
            gap = f"{(rtn - r['ppl']) / (rtn - fp) * 100:.0f}%"
        vs = f"{r['ppl'] / fp:.3f}x" if fp else ""
        lines.append(f"| {r['preset']} | {r['method']} | {r['ppl']:.3f} | {vs} | {gap} | {r['tokens']} | "
                     f"{r['quant_min']:.2f} | {r['eval_min']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
