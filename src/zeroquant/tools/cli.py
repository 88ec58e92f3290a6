"""Command-line interface: zeroquant quantize | export | eval | info | bench. The argument parser, its option
types and help texts, and main(), which dispatches to the commands in zeroquant.tools.commands."""

from __future__ import annotations

import argparse
import signal
import sys

from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.hf import one_line
from zeroquant.tools.commands import cmd_bench, cmd_eval, cmd_export, cmd_info, cmd_quantize

EPILOG = """presets:
  w8a8         INT8 per-channel weights, INT8 token-wise dynamic activations (ZeroQuant)
  w8a16        INT8 per-channel weights, FP activations
  w4a16        INT4 group-wise weights (g128, asymmetric), FP activations
  w4a8         INT4 group-wise weights, INT8 token-wise activations
  w4/8-a16     INT4 MLP weights, INT8 attention weights, FP activations
  w4/8-a8      INT4 MLP weights, INT8 attention weights, INT8 token-wise activations
  w8a8-static  baseline: per-tensor INT8 weights, static per-tensor INT8 activations (needs --calib)
  rtn-w4       baseline: per-row round-to-nearest INT4 weights
Any preset takes a group-size suffix for its group-wise weights: -g64, -g128 (w8a8-g128: group-wise
INT8), -ch (one scale per output channel); a group size that does not divide a layer's input size leaves
a shorter last group. "+gptq" after a preset (w4a16+gptq) rounds its weights with GPTQ (needs --calib);
"+smooth" (w8a8+smooth) first folds SmoothQuant scales into the model where activations are INT8, alpha
searched per site ("+smooth0.5" fixes it; needs --calib). INT4 stores float16 group scales, except
against INT8 activations (w4a8, w4/8-a8): integer group scales times a float row scale (progressive INT4,
whose W4A8 GEMM runs in integers); "+fp16scale" / "+int8scale" choose either for any INT4 preset.
Embeddings, norms and the LM head stay in floating point."""


def _int_option(lo: int, hi: int | None, what: str):
    """argparse type for an integer in [lo, hi]."""

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}" if hi is None
                                             else f"must be in {lo}..{hi}, got {n}")
        return n

    return parse


# counts and lengths: 0 or less would silently mean 'all' or 'none'
_positive_int = _int_option(1, None, "a positive integer")
# seeds: what every generator takes (torch refuses seeds past 64 bits in a traceback)
_seed = _int_option(0, 2**32 - 1, "an integer seed")


def _positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {v}")
    return x


def _alpha(v: str) -> float | str:
    if v == "auto":  # the flag without a value: argparse passes its const through here too
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1], got {v!r}") from None


BENCH_EPILOG = """rows: FP16 and then each preset, each as Hugging Face eager (decode = model.generate; --no-eager
skips it), on zeroquant's static-cache CUDA-graph loop (--no-graph skips it) and compiled on that loop
(--compile: torch.compile around the forward, captured in the same graph), then --peer rows (compiled).
Prefill = one forward over the prompt; decode tok/s = batch x new tokens / time. 'x fp eager' divides by
the first row, 'x best fp' by the fastest FP row. roofline = bytes a decode step must read (weights + filled
KV cache) / step time / the device's copy bandwidth, measured in the same run. Memory: resident = CUDA
memory once the model is ready; weights = its parameters and buffers; file = the saved quantized checkpoint.

random shapes (--random-weights --config): """ + ", ".join(
    ["llama-7b", "gpt-neox-20b", "opt-1.3b", "bert-large"]) + """
Presets take a group-size suffix: w8a8-ch (per-channel INT8 weights), w4a16-g64."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeroquant",
        description="ZeroQuant post-training quantization of local Hugging Face checkpoints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        sp.add_argument("--generic", action="store_true",
                        help="quantize every linear in the blocks of an architecture without an adapter")
        sp.add_argument("--calib", metavar="FILE",
                        help="text file for calibration (static, GPTQ and smoothed presets); never the evaluation text")
        sp.add_argument("--calib-samples", type=_positive_int, default=256,
                        help="calibration sentences (encoders) or 128-token windows (causal LMs); default 256")

    q = sub.add_parser("quantize", help="quantize a model and save it", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model_dir", help="local Hugging Face model directory or .gguf file")
    q.add_argument("--preset", default="w8a8", help="quantization preset (default w8a8; see below)")
    q.add_argument("-o", "--output", required=True, help="directory to write the quantized model to")
    q.add_argument("--group-size", type=int, default=None,
                   help="override the preset's weight group size (input channels per scale; -1 = per row)")
    q.add_argument("--gptq", action="store_true",
                   help="GPTQ rounding of every quantized weight (Hessian-weighted error compensation) from "
                   "--calib FILE, the --lkd-data with --lkd, else text the model writes itself; with --lkd, "
                   "distillation starts from GPTQ's weights")
    q.add_argument("--smooth", nargs="?", const="auto", default=None, type=_alpha, metavar="ALPHA",
                   help="SmoothQuant: fold per-channel scales from the activation maxima into the norms (and v->o, "
                   "up->down) before quantizing, for presets with INT8 activations; alpha in [0, 1], searched per "
                   "site when not given; data as for --gptq")
    q.add_argument("--lkd", action="store_true", help="layer-by-layer distillation of each quantized block")
    q.add_argument("--lkd-data", default="self", metavar="FILE|self|random",
                   help="distillation data: a text/jsonl file, text the model generates itself (default), "
                   "or random token ids")
    q.add_argument("--lkd-inputs", choices=("quantized", "fp", "mixed"), default="quantized",
                   help="what each block's student reads: the quantized model's own input to the block (default; "
                   "it learns to correct the error of the blocks before it), the FP model's (the paper), or a "
                   "random element-wise mix of the two")
    q.add_argument("--lkd-train", choices=("rounding", "weights", "all"), default="rounding",
                   help="what trains: rounding offsets and clipping by signed gradient (default), the master "
                   "weights by straight-through Adam (the paper), or all of them")
    q.add_argument("--lkd-steps", type=_positive_int, default=200,
                   help="steps per block, one batch of 8 sequences each (default 200)")
    q.add_argument("--lkd-lr", type=_positive_float, default=None,
                   help="step size of the rounding offsets and clipping (default 1/steps), decayed linearly")
    q.add_argument("--lkd-weight-lr", type=_positive_float, default=3e-5,
                   help="Adam learning rate of the master weights (--lkd-train weights/all; default 3e-5)")
    q.add_argument("--lkd-samples", type=_positive_int, default=128,
                   help="distillation sequences (default 128; 1/8 of them are held apart to pick each block's best "
                   "iterate)")
    q.add_argument("--lkd-seq-len", type=_positive_int, default=2048,
                   help="distillation sequence length (default 2048)")
    q.add_argument("--lkd-freeze-scales", action="store_true", help="learn no clipping: keep the starting scales")
    q.add_argument("--seed", type=_seed, default=0, help="seed of the distillation data and training (default 0)")
    q.add_argument("--resume", action="store_true", help="continue a run with the same settings that died: the "
                   "blocks it finished (kept beside -o as .NAME.partial) are read back, not quantized again; the "
                   "checkpoint is the one an uninterrupted run writes")
    q.add_argument("--format", choices=("zeroquant", "compressed-tensors"), default="zeroquant",
                   help="checkpoint format: zeroquant's own (default), or compressed-tensors for vLLM, SGLang and "
                   "transformers (see `zeroquant export`)")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty -o directory that is not a "
                   "checkpoint (files zeroquant does not write are kept)")
    common(q)
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="rewrite a zeroquant checkpoint in the compressed-tensors format",
                       description="Write a quantized checkpoint as compressed-tensors (the format llm-compressor "
                       "writes; vLLM, SGLang and transformers load it): the same integers and scales, no "
                       "re-quantization. Schemes that format cannot spell (a group size that leaves a short last "
                       "group, GPT-2's Conv1D layers) are refused and nothing is written. `zeroquant.load_quantized` "
                       "reads the result back onto zeroquant's kernels.")
    x.add_argument("quant_dir", help="a directory written by `zeroquant quantize`")
    x.add_argument("-o", "--output", required=True, help="directory to write the compressed-tensors model to")
    x.add_argument("--overwrite", action="store_true", help="write into a non-empty -o directory that is not a "
                   "checkpoint (files zeroquant does not write are kept)")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="FP vs presets on a text file: perplexity (LMs) or fidelity (encoders)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model_dir", help="local Hugging Face model directory or .gguf file (floating point)")
    e.add_argument("--text", required=True, help="evaluation text file (e.g. wikitext-2 test.txt)")
    e.add_argument("--presets", default="w8a8,w8a8-static,w4/8-a16,rtn-w4",
                   help="comma-separated presets (default: w8a8,w8a8-static,w4/8-a16,rtn-w4)")
    e.add_argument("--max-sentences", type=_positive_int, default=2000, help="encoder sentences (default 2000)")
    e.add_argument("--max-tokens", type=_positive_int, default=None, help="causal LM: cap on evaluated tokens")
    e.add_argument("--seq-len", type=_positive_int, default=None,
                   help="causal LM window (default min(1024, max positions))")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    common(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="FP16 eager vs quantized: prefill latency, decode tokens/s, memory",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model_dir", nargs="?", help="local Hugging Face model directory or .gguf file (floating point)")
    b.add_argument("--random-weights", action="store_true", help="build --config's shape with random weights")
    b.add_argument("--config", help="model shape for --random-weights: llama-7b, gpt-neox-20b, opt-1.3b, bert-large")
    b.add_argument("--layers", type=int, help="override the number of blocks (quick looks only)")
    b.add_argument("--preset", default="w8a8,w4a16,w4/8-a8", help="comma-separated presets (default: %(default)s)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (encoders: sequence length)")
    b.add_argument("--gen-len", type=int, default=64, help="new tokens to decode; 0 = prefill only")
    b.add_argument("--compile", action="store_true", help="add a compiled row for FP16 and every preset "
                   "(torch.compile on the CUDA-graph loop; the first compile of a 7B model takes about a minute)")
    b.add_argument("--fp-compile-mode", metavar="MODE", help="add FP16 rows compiled in these torch.compile modes "
                   "(comma-separated, e.g. max-autotune-no-cudagraphs): 'x best fp' then divides by the fastest")
    b.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    b.add_argument("--no-eager", action="store_true", help="skip the Hugging Face eager rows")
    b.add_argument("--peer", metavar="NAME", help="add a peer's rows in the same run: torchao (int8 and int4 "
                   "weight-only, int8 dynamic activations; bfloat16, compiled), or some of them by name: "
                   "torchao-int8wo, torchao-int4wo, torchao-int8dq; needs it installed")
    b.add_argument("--no-save", action="store_true", help="do not save each quantized model to measure its file")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions, median reported (default 3)")
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--json", metavar="FILE", help="also write settings and rows as JSON")
    b.add_argument("--md", metavar="FILE", help="also write the printed table as markdown")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="describe a saved quantized model (either format)")
    i.add_argument("out_dir")
    i.set_defaults(func=cmd_info)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for sp in sub.choices.values():  # also after the command; SUPPRESS keeps a top-level --debug
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    return p


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM (kill, a job scheduler's time limit) cleans up as Ctrl-C does: saves remove their temp dirs. SIGINT
    gets the same handler, not Python's default: a library imported earlier may have replaced or ignored that."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        args.func(args)
    except (ZeroQuantError, OSError) as e:  # OSError: files and disks the user names (no space, permissions)
        if args.debug:
            raise
        print(f"zeroquant: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"zeroquant: interrupted ({str(e) or 'SIGINT'})", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
