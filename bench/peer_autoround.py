r"""The peer row: Intel AutoRound (PyPI `auto-round`, SignRound: 200 steps of signed-gradient tuning of each
weight's rounding offset and each group's clipping range, block by block) at zeroquant's W4A16 format, on the
same model, calibration windows and evaluation text as bench/real_decoders.py, evaluated by zeroquant's own
perplexity on the fake-quantized (quantize-dequantize) model that AutoRound leaves in memory.

Format: 4 bits, groups of 128 input channels, asymmetric (sym=False) with an integer zero point in [0, 15],
only the decoder blocks' linears (AutoRound skips lm_head and the embeddings by default; the script asserts
that the set it quantized is exactly zeroquant's `linear_kinds`). Before evaluating, every quantized weight is
checked to lie on its group's 16-level grid (<= 16 distinct values per row and group, and equal to
(q - zp) * scale with AutoRound's own integer q in [0, 15], scale and zp) so the row is the quantized model's.
Remaining differences from zeroquant's w4a16 (`WeightQuant(4, 128, symmetric=False, scale_dtype="float16")`):
- the algorithm (the point of the row): AutoRound tunes per-weight rounding offsets in [-0.5, 0.5] and
  per-group min/max scaling of the range by SignRound; zeroquant's rows are RTN / GPTQ / LKD.
- scales: both round the scale to float16 (AutoRound `scale_dtype="fp16"`, its default, passed explicitly) and
  use an integer zero point round(-min / scale) of a range that contains 0; AutoRound computes (max - min) / 15
  after its tuned min/max multipliers (clamped to [0, 1], initially 1) and does not clamp the zero point
  (it cannot leave [0, 15]); zeroquant clamps it to [0, 15].
- groups that do not fill 128 channels (SmolLM2's 576 = 4 x 128 + 64, stories260K's 64 and 172): AutoRound
  pads with zeros, zeroquant uses a shorter last group; both ranges contain 0, so the grid is the same.
- calibration: the same `lkd_batches(calib, model, tok, samples, data_len, seed=0)` windows, but AutoRound
  masks the last position of every window (its "never an all-ones attention mask" workaround), so block
  inputs of that one token differ; its tuning samples mini-batches of `--batch-size` windows (default 8,
  AutoRound's default) with its own seed 42.
- dtypes: the FP model is zeroquant.load_fp_model's (float16 on CUDA, float32 on CPU; --dtype overrides),
  evaluated in that dtype as in real_decoders. AutoRound casts the whole model to its tuning dtype for good:
  with its default amp that is bfloat16 on CUDA and CPU alike, which would round each (q - zp) * scale to 8
  significant bits. This script passes amp=False by default (float32 tuning and qdq weights, then cast to the
  FP model's dtype: float16 keeps (q - zp) * scale to within 0.8% of a step); --amp runs AutoRound's own
  bfloat16 recipe (weights off the exact grid by up to 6% of a step, still <= 16 values per group).

Environment. auto-round 0.16.1 declares accelerate, datasets, numpy, py-cpuinfo, torch, tqdm,
transformers>=4.38, pydantic, requests. Tested on CPU with torch 2.13.0+cpu, transformers 5.17.0,
huggingface_hub 1.33.0, accelerate 1.15.0, tokenizers 0.23.2 (the GPU image's versions; no clash with
auto-round's pins). `datasets` pulls pyarrow + pandas (> 50 MB of wheels) and auto-round only uses it to
download named calibration sets, but imports it at module level (auto_round.utils, auto_round.calib_dataset):
when it is not installed this script registers an inert stand-in module named `datasets` (every function
raises) before importing auto_round; a list of token windows never reaches it.

GPU machine without internet (Python 3.12; torch, transformers, accelerate, numpy, safetensors, tokenizers,
sentencepiece, huggingface_hub already there). The wheels in .whl/ (git-ignored, 4.9 MB), fetched with
`python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
NAME==VERSION`:
- auto_round-0.16.1 (py3-none-any; holds auto_round and auto_round_extension): the peer
- pydantic-2.14.4, pydantic_core-2.50.5 (cp312 manylinux2014), annotated_types-0.8.0, typing_inspection-0.4.5,
  typing_extensions-4.16.0 (pydantic_core needs >= 4.16): auto_round.autoround imports pydantic
- py_cpuinfo-9.0.0: auto_round.inference.backend imports cpuinfo at module level
- gguf-0.19.0: transformers' GGUF loader, for zeroquant.load_fp_model on SmolLM2's .gguf
- requests-2.34.2, urllib3-2.8.0, charset_normalizer-3.5.3 (cp312 manylinux_2_28), idna-3.21,
  certifi-2026.10.19.post1: declared by auto-round and gguf, imported by auto_round's export / mllm modules
  (not on this script's path; idna and certifi usually come with httpx already)
Not shipped: datasets (see above), torch / transformers / accelerate / numpy / tqdm / psutil / pyyaml (there).

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    SMOL=PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:src python bench/peer_autoround.py --model $SMOL \
        --text ../shared/assets/wikitext-2/test.txt --calib ../shared/assets/wikitext-2/valid.txt \
        --samples 128 --data-len 2048 --iters 200 --device cuda --out bench/results/peer_autoround_smollm2

AutoRound's own CUDA default, torch.compile of its block step, stays on (--no-compile turns it off).
--data-len 2048 is AutoRound's own recipe (128 x 2048 tokens); zeroquant's rows in
bench/results/smollm2_wikitext2.json saw 128 x 128-token windows (its meta), so a like-for-like row beside them
is --data-len 128 (then --merge bench/results/smollm2_wikitext2.json).

--merge FILE inserts the row into a real_decoders JSON file (its "rows" list, replacing a row of the same key);
real_decoders.py's own markdown() orders rows by its ROWS list, which has no "autoround" method, so the merged
file's table is this script's .md, not a re-rendered real_decoders table.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.api import linear_kinds
from zeroquant.tools.evaluate import perplexity, read_text


def stub_datasets() -> bool:
    """Register an inert `datasets` module when the real one is not installed (see the docstring)."""
    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return False
    mod = types.ModuleType("datasets")
    mod.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    mod.__version__ = "0.0.0"

    def unavailable(*args, **kwargs):
        raise ImportError("the `datasets` package is not installed (a stand-in from bench/peer_autoround.py)")

    for name in ("load_dataset", "load_from_disk", "concatenate_datasets", "interleave_datasets"):
        setattr(mod, name, unavailable)
    for name in ("Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict", "Features", "Sequence",
                 "Value", "ClassLabel", "Image"):
        setattr(mod, name, type(name, (), {"__init__": unavailable}))
    sys.modules["datasets"] = mod
    return True


def lift_shape_rule(names: list[str]) -> list[str]:
    """AutoRound keeps a W4A16 layer whose weight has a dimension that is not a multiple of 32 in FP (its packed
    kernels' rule; stories260K's 172-wide MLP). Its quantize-dequantize pads any group, so for an in-memory
    evaluation the rule can be lifted: those of `names` go back to the default config. Returns the list the
    patched resolver appends the lifted layers' names to."""
    import copy

    from auto_round.compressors import layer_config_resolver as lcr

    lifted: list[str] = []
    orig = lcr.apply_layer_config_special_cases

    def patched(layer_config, model, default_dict, *rest):
        out = orig(layer_config, model, default_dict, *rest)
        for name in names:
            cfg = out[0].get(name)
            if cfg is not None and cfg.get("bits") == 16 and cfg.get("data_type") == "fp" and cfg.get("fixed_by_user"):
                out[0][name] = {**copy.deepcopy(default_dict), "fixed_by_user": False, "in_blocks": True}
                lifted.append(name)
        return out

    lcr.apply_layer_config_special_cases = patched
    return lifted


def autoround_w4a16(model, tok, windows: torch.Tensor, args, compile_: bool | None) -> dict:
    """Run AutoRound in place on `model` (its block linears end up holding quantize-dequantize weights)."""
    from auto_round import AutoRound

    # AutoRound casts the model to its tuning dtype for good: bfloat16 with amp (its default, on CUDA as on CPU,
    # whatever the model's dtype), float32 without; the caller casts the result back to the FP model's dtype
    # one sample per window; an explicit all-ones mask keeps AutoRound from deriving one from the pad token
    data = [{"input_ids": w[None].clone(), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)}
            for w in windows]
    ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters,
                   dataset=data, nsamples=args.samples, seqlen=windows.shape[1], batch_size=args.batch_size,
                   device_map=args.device, low_cpu_mem_usage=False, seed=args.seed, enable_torch_compile=compile_,
                   scale_dtype="fp16", amp=args.amp)
    out = ar.quantize()
    return out[0] if isinstance(out, tuple) else model


@torch.no_grad()
def check_grid(model, names: list[str], bits: int, group_size: int, tol: float) -> dict:
    """Assert every named linear's weight lies on its per-group 2**bits-level grid and equals (q - zp) * scale
    with AutoRound's integer q, scale and zero point to within `tol` of a step; return summary stats."""
    levels = 2**bits
    most, worst_err, with_params = 0, 0.0, 0
    for name in names:
        m = model.get_submodule(name)
        w = m.weight.detach().float()
        assert w.device.type != "meta", f"{name}: weight left on the meta device"
        n, k = w.shape
        for g, s in enumerate(range(0, k, group_size)):
            wg = w[:, s : s + group_size]
            distinct = 1 + (wg.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1)
            most = max(most, int(distinct.max()))
            assert int(distinct.max()) <= levels, (
                f"{name} group {g}: {int(distinct.max())} distinct values > {levels}: not quantized")
        scale, zp = getattr(m, "scale", None), getattr(m, "zp", None)
        if isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor) and scale.numel() > 1:
            with_params += 1
            sc = scale.float().to(w.device).repeat_interleave(group_size, dim=1)[:, :k]
            z = zp.float().to(w.device).repeat_interleave(group_size, dim=1)[:, :k]
            assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= levels - 1, f"{name}: zero point"
            q = (w / sc + z).round()
            assert q.min() >= 0 and q.max() <= levels - 1, f"{name}: integers outside [0, {levels - 1}]"
            err = (((q - z) * sc - w).abs() / sc).max().item()
            worst_err = max(worst_err, err)
            assert err <= tol, f"{name}: weight != (q - zp) * scale (max error {err:.3g} of a step > {tol:.3g})"
    return {"linears": len(names), "max_distinct_per_group": most, "with_scale_zp": with_params,
            "max_reconstruction_error_steps": worst_err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or .gguf file")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--data-len", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--max-tokens", type=int, help="cap on evaluated tokens (default: the whole text)")
    p.add_argument("--batch", type=int, default=4, help="perplexity windows per forward")
    p.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per block (default 200)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="AutoRound's tuning batch (default 8, its own)")
    p.add_argument("--seed", type=int, default=42, help="AutoRound's seed (default 42, its own)")
    p.add_argument("--amp", action="store_true",
                   help="AutoRound's default mixed precision: tune (and write the qdq weights) in bfloat16; "
                   "default: float32 tuning, weights cast to the FP model's dtype after")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="FP model dtype (default: zeroquant's, float16 on CUDA, float32 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="turn off AutoRound's torch.compile (faster on CPU)")
    p.add_argument("--all-shapes", action="store_true",
                   help="also quantize block linears AutoRound skips for a dimension not a multiple of 32")
    p.add_argument("--fp", action="store_true", help="also evaluate the FP model (an extra 'fp -' row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    p.add_argument("--merge", help="a real_decoders JSON file to insert (or replace) the row in")
    args = p.parse_args()

    stubbed = stub_datasets()
    import auto_round
    import transformers

    torch.manual_seed(0)
    model, tok = zq.load_fp_model(args.model, args.device)
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    dtype = model.dtype
    text = read_text(args.text)
    batches = lkd_batches(args.calib, model, tok, args.samples, args.data_len, seed=0)
    windows = torch.cat([b["input_ids"] for b in batches])
    if windows.shape[0] < args.samples:
        print(f"warning: {args.calib} holds only {windows.shape[0]} windows of {args.data_len} tokens", flush=True)
    names = sorted(linear_kinds(model))
    dev = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else (
        platform.processor() or platform.machine())
    meta = {"model": args.model, "text": args.text, "calib": args.calib, "samples": int(windows.shape[0]),
            "data_len": args.data_len, "seq_len": args.seq_len, "max_tokens": args.max_tokens, "iters": args.iters,
            "bits": args.bits, "group_size": args.group_size, "sym": False, "batch_size": args.batch_size,
            "seed": args.seed, "auto_round": auto_round.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "device": dev, "model_dtype": str(model.dtype),
            "datasets_stub": stubbed}
    rows = []

    def evaluate(m) -> dict:
        t = time.perf_counter()
        r = perplexity(m, tok, text, args.seq_len, args.max_tokens, args.batch, progress=False)
        return {"ppl": r["ppl"], "tokens": r["tokens"], "eval_min": (time.perf_counter() - t) / 60}

    if args.fp:
        rows.append({"key": "fp -", "preset": "fp", "method": "-", **evaluate(model), "quant_min": 0.0})
        print("fp", rows[-1], flush=True)

    lifted = lift_shape_rule(names) if args.all_shapes else []
    t0 = time.perf_counter()
    qmodel = autoround_w4a16(model, tok, windows, args, False if args.no_compile else None)
    quant_min = (time.perf_counter() - t0) / 60
    tuned_dtype = qmodel.dtype
    qmodel = qmodel.to(device=args.device, dtype=dtype).eval()
    quantized = sorted(n for n, m in qmodel.named_modules()
                       if isinstance(m, torch.nn.Linear) and getattr(m, "bits", 16) <= 8)
    meta["shape_rule_lifted"] = sorted(set(lifted))
    missing = sorted(set(names) - set(quantized))
    assert not missing, (f"AutoRound left {len(missing)} of zeroquant's block linears in FP: {missing[:8]}"
                         + ("" if args.all_shapes else " (--all-shapes lifts its multiple-of-32 rule)"))
    assert quantized == names, f"AutoRound also quantized {sorted(set(quantized) - set(names))}"
    # (q - zp) * scale with q - zp up to 15, rounded to AutoRound's dtype, then to the FP model's: 16 ulps of a step
    tol = 16 * max(torch.finfo(tuned_dtype).eps, torch.finfo(dtype).eps)
    meta.update(autoround_amp=args.amp, autoround_dtype=str(tuned_dtype), grid_tolerance_steps=tol)
    meta["grid_check"] = check_grid(qmodel, names, args.bits, args.group_size, tol)
    print("grid check", meta["grid_check"], flush=True)
    # zeroquant's preset name of the same format (w4a16 = 4 bits, groups of 128, asymmetric)
    preset = "w4a16" if (args.bits, args.group_size) == (4, 128) else f"w{args.bits}a16-g{args.group_size}"
    key = f"{preset} autoround"
    row = {"key": key, "preset": preset, "method": "autoround", **evaluate(qmodel), "quant_min": quant_min}
    row = {k: row[k] for k in ("key", "preset", "method", "ppl", "tokens", "quant_min", "eval_min")}
    rows.append(row)
    print(key, row, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    merged = json.loads(Path(args.merge).read_text()) if args.merge else {"rows": []}
    # the FP perplexity for "vs FP": this run's (--fp), else the merge file's over the same number of tokens
    fp = next((r["ppl"] for r in rows + merged["rows"]
               if r.get("preset") == "fp" and "ppl" in r and r.get("tokens") == row["tokens"]), None)
    lines = [f"{args.model} on {args.text} ({row['tokens']} tokens, {args.seq_len}-token windows), {dev}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}, auto-round {meta['auto_round']}; calibration: "
             f"{meta['samples']} x {args.data_len} tokens of {args.calib}, {args.iters} iters", "",
             "| preset | method | perplexity | vs FP | tokens | quantize min | eval min |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['ppl'] / fp:.3f}x" if fp else ""
        lines.append(f"| {r['preset']} | {r['method']} | {r['ppl']:.3f} | {vs} | {r['tokens']} | "
                     f"{r['quant_min']:.2f} | {r['eval_min']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    if args.merge:
        path, doc = Path(args.merge), merged
        doc["rows"] = [r for r in doc["rows"] if r.get("key") != key] + [row]
        doc.setdefault("meta", {})["autoround"] = meta
        path.write_text(json.dumps(doc, indent=2))
        print(f"merged {key!r} into {path}")


if __name__ == "__main__":
    main()
