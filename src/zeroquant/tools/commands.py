"""The command implementations behind the CLI: quantize, export, eval, info and bench, each taking the parsed
arguments, and the checks and calibration-data helpers they share."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.models.hf import check_device, load_fp_model, one_line


def _default_device(arg: str | None) -> str:
    """--device, checked before any work: a CUDA device this machine has, or the CPU."""
    if arg:
        return check_device(arg)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_report_file(path: str | None, flag: str) -> None:
    """A --json/--md file is written after all the work: fail now if it cannot be."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ZeroQuantError(f"{flag} {path} is a directory; name a file")
    if not p.resolve().parent.is_dir():
        raise PathError(f"{flag} {path}: directory {p.resolve().parent} does not exist")
    if (p.exists() and not os.access(p, os.W_OK)) or not os.access(p.resolve().parent, os.W_OK | os.X_OK):
        raise ZeroQuantError(f"{flag} {path}: not writable")


def _calib_texts(path: str | None, n: int) -> list[str] | None:
    if path is None:
        return None
    from zeroquant.tools.evaluate import read_text, sentences

    texts = sentences(read_text(path), n)
    if not texts:
        raise ZeroQuantError(f"calibration file has no usable sentences: {path}")
    return texts


def _calib_data(path: str | None, texts: list[str] | None, n: int, model, tok):
    """Calibration data from --calib: for causal LMs, n windows of 128 tokens of the file's token stream (GPTQ's
    Hessians need thousands of tokens, and windows have no padding); for encoders, its first n sentences."""
    from zeroquant.algorithms.lkd_data import lkd_batches
    from zeroquant.models.hf import is_causal_lm

    if path is None or not is_causal_lm(model):
        return texts
    return lkd_batches(path, model, tok, n, 128)


def cmd_quantize(args) -> None:
    from zeroquant.algorithms.lkd_data import lkd_batches
    from zeroquant.algorithms.ranks import init_from_env
    from zeroquant.api import quantize
    from zeroquant.core.config import resolve_config, with_group_size, with_rounding, with_smoothing
    from zeroquant.formats.checkpoint import check_output_dir, save_quantized
    from zeroquant.models.lazy import has_safetensors, open_lazy

    ranks = init_from_env()  # several processes under torchrun: each quantizes with a share of the batches
    lead = ranks.rank == 0  # prints and writes
    cfg = resolve_config(args.preset)
    if args.group_size is not None:
        cfg = with_group_size(cfg, args.group_size)
    if args.gptq:
        cfg = with_rounding(cfg, "gptq")
    if args.smooth is not None:
        cfg = with_smoothing(cfg, args.smooth)
    device = _default_device(args.device)
    check_output_dir(args.output, sources=(args.model_dir,), overwrite=args.overwrite)
    texts = _calib_texts(args.calib, args.calib_samples)  # a bad file fails before the model is loaded
    if args.lkd and args.lkd_data not in ("self", "random"):
        from zeroquant.tools.evaluate import read_text

        read_text(args.lkd_data)
    # round-to-nearest reads no data: it needs no tokenizer (one found beside the model is still saved)
    needs_tok = args.lkd or args.calib is not None or cfg.needs_data
    # A safetensors directory is read a block at a time (the FP model is never in memory whole), unless the
    # data is text the FP model must write itself first.
    self_text = args.lkd_data == "self" if args.lkd else args.calib is None and (cfg.uses_gptq or cfg.uses_smoothing)
    blocks = None
    if has_safetensors(args.model_dir) and not self_text:
        model, tok, blocks = open_lazy(args.model_dir, device, args.generic, tokenizer=needs_tok)
    else:
        model, tok = load_fp_model(args.model_dir, device, args.generic, tokenizer=needs_tok)
    if args.format == "compressed-tensors":  # refuse an unexportable scheme before the quantization work
        from zeroquant.formats.compressed_format import check_exportable

        check_exportable(model, cfg, args.generic)
    lkd, extra = None, {}
    if args.lkd:  # the distillation data calibrates too
        from zeroquant.algorithms.lkd import LKDConfig
        from zeroquant.algorithms.lkd import report as lkd_report
        from zeroquant.tools.evaluate import format_table

        lkd = LKDConfig(steps=args.lkd_steps, lr=args.lkd_lr, weight_lr=args.lkd_weight_lr, inputs=args.lkd_inputs,
                        train=args.lkd_train, clip=not args.lkd_freeze_scales, seed=args.seed)
        calib = lkd_batches(args.lkd_data, model, tok, args.lkd_samples, args.lkd_seq_len, seed=args.seed)
    else:
        calib = _calib_data(args.calib, texts, args.calib_samples, model, tok)
        if (cfg.uses_gptq or cfg.uses_smoothing) and calib is None:  # data-free: text the model writes itself
            calib = lkd_batches("self", model, tok, args.lkd_samples, 128, seed=args.seed)
        elif cfg.needs_calibration and calib is None:
            raise ZeroQuantError(f"preset {cfg.name!r} uses static activation scales: pass --calib FILE")
    from dataclasses import asdict

    from zeroquant.algorithms.block_store import BlockStore, store_dir
    from zeroquant.formats.provenance import data_record

    source = args.lkd_data if args.lkd else (args.calib if calib is not None and args.calib else "self")
    made = {"model": Path(args.model_dir).name, "preset": cfg.name,
            "options": {"group_size": args.group_size, "gptq": args.gptq, "smooth": args.smooth,
                        "generic": args.generic, "format": args.format},
            "data": data_record(source, calib), "lkd": None if lkd is None else asdict(lkd), "seed": args.seed,
            "processes": ranks.world}
    # Finished blocks go to a hidden sibling of the output as they finish; --resume reads them back.
    run = {**made, "source": str(Path(args.model_dir).resolve()), "device": device}
    store = BlockStore(store_dir(args.output), run, resume=args.resume) if lead else None
    ranks.barrier()  # the others read the store once the writer has set it up
    store = store or BlockStore(store_dir(args.output), run, resume=args.resume, writer=False)
    if store.done and lead:
        print(f"resuming: {store.done} finished block(s) in {store.path}")
    try:
        qmodel = quantize(model, cfg, calib_data=calib, tokenizer=tok, inplace=True, allow_generic=args.generic,
                          lkd=lkd, blocks=blocks, store=store, ranks=ranks, progress=lead)
        if not lead:
            ranks.barrier()  # until the writer has saved
            return
        if lkd is not None:
            extra["lkd_report.json"] = {"data": args.lkd_data, **lkd_report(lkd, qmodel.zeroquant.lkd)}
            print(format_table(qmodel.zeroquant.lkd))
        out = save_quantized(qmodel, args.output, tokenizer=tok, extra=extra, format=args.format,
                             overwrite=args.overwrite, provenance=made)
        ranks.barrier()
    except (ZeroQuantError, OSError, KeyboardInterrupt) as e:
        n = store.finished()
        if not n:
            raise
        kept = f"{n} finished block(s) kept in {store.path}: the same command with --resume continues from them"
        if isinstance(e, KeyboardInterrupt):
            print(f"zeroquant: {kept}", file=sys.stderr)
            raise
        raise (PathError if isinstance(e, OSError) else ZeroQuantError)(f"{one_line(e)} ({kept})") from e
    store.close()
    print(f"saved {cfg.name} model to {out} ({args.format})")


def cmd_export(args) -> None:
    from zeroquant.formats.checkpoint import check_output_dir, load_quantized, save_quantized

    check_output_dir(args.output, sources=(args.quant_dir,), overwrite=args.overwrite)
    model = load_quantized(args.quant_dir, fuse=False)
    out = save_quantized(model, args.output, format="compressed-tensors", overwrite=args.overwrite)
    print(f"wrote {model.zeroquant.config.name} from {args.quant_dir} as compressed-tensors to {out}")


def cmd_eval(args) -> None:
    from zeroquant.core.config import resolve_config
    from zeroquant.tools.evaluate import EvalSettings, read_text
    from zeroquant.tools.report import print_report, report

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    configs = [resolve_config(p) for p in presets]
    device = _default_device(args.device)
    _check_report_file(args.json, "--json")
    text = read_text(args.text)
    calib = _calib_texts(args.calib, args.calib_samples)
    if calib is None and any(c.needs_data for c in configs):
        raise ZeroQuantError("static, +gptq and +smooth presets need --calib FILE (never calibrate on the evaluation "
                             "text)")
    model, tok = load_fp_model(args.model_dir, device, args.generic)
    settings = EvalSettings(max_sentences=args.max_sentences, max_tokens=args.max_tokens,
                            seq_len=args.seq_len, batch_size=args.batch_size)
    calib = _calib_data(args.calib, calib, args.calib_samples, model, tok)
    rows = report(model, tok, text, presets, calib, settings, allow_generic=args.generic)
    print(f"\nmodel: {args.model_dir}  text: {args.text}  device: {next(model.parameters()).device}")
    print_report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                               for r in rows], indent=2))


def _info_compressed(path: Path) -> None:
    from zeroquant.formats.compressed_format import read_config

    qc = read_config(path)
    _check_safetensors_files(path)
    print(f"format:        compressed-tensors ({qc.get('format')}), written by compressed-tensors {qc.get('version')}")
    for name, g in qc.get("config_groups", {}).items():
        w, a = g.get("weights") or {}, g.get("input_activations")
        wdesc = f"W{w.get('num_bits')} {w.get('strategy')}" + (f" {w['group_size']}" if w.get("group_size") else "")
        adesc = "A16" if not a else f"A{a.get('num_bits')} {a.get('strategy')}" + (
            " dynamic" if a.get("dynamic") else " static")
        wdesc += "" if w.get("symmetric", True) else " asym"
        print(f"  {name}: {wdesc} / {adesc} ({g.get('format')}), targets {', '.join(g.get('targets', []))}")
    print(f"ignored:       {', '.join(qc.get('ignore') or []) or '-'}")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"weights file:  {size / 1e6:.2f} MB")


def _check_safetensors_files(path: Path) -> None:
    """Every weights file of a compressed-tensors checkpoint opens and its header covers the file."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ZeroQuantError(f"damaged checkpoint: {path} has no .safetensors file")
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ZeroQuantError(f"damaged checkpoint: {f}: not a readable safetensors file ({e})") from None


def cmd_info(args) -> None:
    from zeroquant.formats.checkpoint import WEIGHTS_FILE, checkpoint_format
    from zeroquant.formats.checkpoint_read import read_manifest, verify_checkpoint

    if checkpoint_format(args.out_dir) == "compressed-tensors":
        return _info_compressed(Path(args.out_dir))
    read_manifest(args.out_dir)  # not a checkpoint at all: its own message
    try:  # what info summarises must be what a load would find
        m = verify_checkpoint(args.out_dir)
    except ZeroQuantError as e:
        raise ZeroQuantError(f"damaged checkpoint: {e}") from None
    mods = m["modules"]
    by_kind: dict[str, int] = {}
    for spec in mods.values():
        w, a = spec["weight"], spec["act"]
        key = f"W{w['bits']} " + ("per-tensor" if w["per_tensor"] else f"g{w['group_size']}") + (
            " asym" if not w["symmetric"] else "") + (" / A16" if a is None else
                                                      f" / A{a['bits']} {'token' if a['dynamic'] else 'static'}")
        by_kind[key] = by_kind.get(key, 0) + 1
    size = (Path(args.out_dir) / WEIGHTS_FILE).stat().st_size
    print(f"preset:        {m['preset']}")
    print(f"model class:   {m['model_class']} ({m['dtype']})")
    print(f"quantized:     {len(mods)} linear layers")
    for k, v in sorted(by_kind.items()):
        print(f"  {v:4d} x {k}")
    print(f"weights file:  {size / 1e6:.2f} MB")
    if isinstance(m.get("provenance"), dict):
        from zeroquant.formats.provenance import describe

        print("\n".join(describe(m["provenance"])))


def cmd_bench(args) -> None:
    from zeroquant.tools.benchmark import BenchSettings, describe, run, table, to_json

    if args.random_weights != (args.config is not None):
        raise ZeroQuantError("--random-weights and --config NAME go together")
    if args.layers is not None and (args.config is None or args.layers < 1):
        raise ZeroQuantError("--layers N (N >= 1) only applies to --random-weights --config shapes")
    for name in ("batch", "prompt_len", "reps"):
        if getattr(args, name) < 1:
            raise ZeroQuantError(f"--{name.replace('_', '-')} must be at least 1")
    if args.gen_len < 0:
        raise ZeroQuantError("--gen-len must be 0 or more")
    _check_report_file(args.json, "--json")
    _check_report_file(args.md, "--md")
    s = BenchSettings(model_dir=args.model_dir, config=args.config, layers=args.layers,
                      presets=[p.strip() for p in args.preset.split(",") if p.strip()], batch=args.batch,
                      prompt_len=args.prompt_len, gen_len=args.gen_len, compile=args.compile,
                      graph=not args.no_graph, eager=not args.no_eager, reps=args.reps, seed=args.seed,
                      device=_default_device(args.device), save_files=not args.no_save,
                      peers=[p.strip() for p in (args.peer or "").split(",") if p.strip()],
                      fp_compile_modes=[m.strip() for m in (args.fp_compile_mode or "").split(",") if m.strip()])
    def write(rows) -> str:  # after every row: a run cut short keeps what it measured
        md = f"{describe(s, rows)}\n\n{table(rows)}"
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(rows, s), indent=2))
        if args.md:
            Path(args.md).write_text(md + "\n")
        return md

    rows = run(s, progress=lambda m: print(m, file=sys.stderr, flush=True), on_row=write)
    print(write(rows))
