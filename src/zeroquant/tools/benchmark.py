"""`zeroquant bench`: FP16 Hugging Face eager vs quantized models, in one run, on what users feel.

Causal LMs: prefill latency (one forward over the [B, P] prompt), decode tokens/s and memory. Encoders:
forward latency over [B, T]. Every model is built fresh for its row (loaded from MODEL_DIR, or a named
shape with random weights), so rows do not share caches or memory. Rows:
- fp16 eager: the Hugging Face model as users run it (decode = model.generate, greedy);
- fp16 graph: the same weights on zeroquant.tools.runtime (static KV cache, one CUDA-graph replay per token),
  which separates what the graph buys from what quantization buys;
- each preset, eager (model.generate on the kernels) and graph;
- compile (--compile), for FP16 and every preset: torch.compile around the forward on the same loop, the
  compiled step captured in the same CUDA graph (zeroquant.tools.runtime, compile=True);
- peers (--peer torchao): torchao's int8 weight-only, int4 weight-only (tinygemm, g128) and int8 dynamic-
  activation x int8-weight on the same block linears of a bfloat16 copy (torchao's INT4 kernel takes bfloat16
  only), compiled on the same loop, as torchao's users run them.
Decode rows also report their roofline fraction: the bytes a step must read (the weights, less the input
embedding table of which it reads one row per token, plus the filled part of the KV cache) over the step's
time, as a fraction of the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from zeroquant.core.errors import ZeroQuantError

# Shapes of well-known checkpoints, for speed measurements with random weights (nothing is downloaded).
RANDOM_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama-7b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6)),
    "gpt-neox-20b": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=50432, hidden_size=6144, intermediate_size=24576, num_hidden_layers=44,
        num_attention_heads=64, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)),
    "opt-1.3b": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True)),
    "bert-large": ("BertConfig", "BertModel", dict(
        vocab_size=30522, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, max_position_embeddings=512)),
}


@dataclass
class BenchSettings:
    model_dir: str | None = None  # a local FP checkpoint, or None with `config` for random weights
    config: str | None = None  # a RANDOM_CONFIGS name
    layers: int | None = None  # override the depth (quick looks; not for reported numbers)
    presets: list[str] = field(default_factory=lambda: ["w8a8", "w4a16", "w4/8-a8"])
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 64
    compile: bool = False  # also run the compiled rows (FP and every preset)
    # extra FP rows compiled in these torch.compile modes (e.g. max-autotune-no-cudagraphs), so quantized rows
    # meet the fastest FP16 a user could compile, not just the default mode
    fp_compile_modes: list[str] = field(default_factory=list)
    graph: bool = True  # also run the CUDA-graph rows (CUDA only)
    eager: bool = True  # also run the eager rows
    reps: int = 3
    seed: int = 0
    device: str = "cuda"
    save_files: bool = True  # save each quantized model to a temp dir and report the file size
    peers: list[str] = field(default_factory=list)  # "torchao": its rows (zeroquant.tools.peers) beside ours


@dataclass
class Row:
    variant: str
    prefill_ms: float | None = None  # causal LM: the prompt forward to its first token (TTFT); encoder: the forward
    decode_tok_s: float | None = None
    resident_gib: float | None = None  # CUDA memory allocated once the model is ready
    peak_gib: float | None = None  # CUDA peak while it ran
    weights_gib: float | None = None  # bytes of its parameters and buffers
    file_gib: float | None = None  # saved checkpoint (quantized rows)
    step_gb: float | None = None  # bytes one decode step must read (weights + filled KV cache), 1e9
    roofline: float | None = None  # step_gb / step time / copy_gb_s
    copy_gb_s: float | None = None  # the device's copy bandwidth, measured at the start of the run
    note: str = ""


def random_config(name: str, layers: int | None = None):
    import transformers

    if name not in RANDOM_CONFIGS:
        raise ZeroQuantError(f"unknown --config {name!r}; choose one of: {', '.join(RANDOM_CONFIGS)}")
    cfg_cls, model_cls, kwargs = RANDOM_CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    if layers is not None:
        cfg.num_hidden_layers = layers
    cfg.architectures = [model_cls]
    return cfg


def build_model(s: BenchSettings) -> nn.Module:
    """A fresh FP16 (CPU: FP32) model for one row, in eval mode on s.device."""
    import transformers

    dtype = torch.float16 if s.device.startswith("cuda") else torch.float32
    if s.model_dir is not None:
        from zeroquant.models.hf import load_fp_model

        return load_fp_model(s.model_dir, s.device, tokenizer=False)[0].to(dtype)
    cfg = random_config(s.config, s.layers)
    cls = getattr(transformers, cfg.architectures[0])
    torch.manual_seed(s.seed)
    with torch.device(s.device):  # initialise on the GPU: seconds for 7B parameters instead of minutes
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def is_causal(model: nn.Module) -> bool:
    return hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall_times(fn: Callable[[], object], reps: int, device: str) -> list[float]:
    """Wall seconds of each of reps runs of fn() after one warm-up, synchronised on CUDA."""
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def timed(fn: Callable[[], object], reps: int, device: str) -> float:
    """Median wall seconds of fn() over reps runs after one warm-up, synchronised on CUDA."""
    return statistics.median(wall_times(fn, reps, device))


def _gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompt(s: BenchSettings, model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed)
    vocab = model.config.vocab_size
    return torch.randint(min(1000, vocab - 1), vocab, (s.batch, s.prompt_len), generator=g).to(s.device)


def measure(model: nn.Module, s: BenchSettings, mode: str, compile_mode: str | None = None) -> Row:
    """One row: mode "eager", "graph" or "compile" (in torch.compile's compile_mode; None: its default)."""
    from zeroquant.tools.evaluate import weight_bytes
    from zeroquant.tools.runtime import GraphedForward, GreedyDecoder, last_logits_only

    cuda = s.device.startswith("cuda")
    ids = _prompt(s, model)
    row = Row(mode, weights_gib=_gib(weight_bytes(model)))
    if cuda:
        _free()
        row.resident_gib = _gib(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        n = s.gen_len if is_causal(model) else 0
        if n == 0:
            # One forward over [B, T]: an encoder's, or a decoder's prompt without a cache. With the attention
            # mask, as a tokenizer gives it: without one, transformers < 5.23 builds an all-ones mask with a
            # stride-0 last dimension under CUDA-graph capture, which no fused SDPA kernel accepts.
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            kwargs = {"use_cache": False, **last_logits_only(model)} if is_causal(model) else {}
            if mode == "eager":
                fwd = lambda: model(**inputs, **kwargs)
            elif cuda:
                graphed = GraphedForward(model, compile=mode == "compile", compile_mode=compile_mode, **inputs,
                                         **kwargs)
                fwd = lambda: graphed(**inputs)
            else:  # compile on CPU: no graph to capture
                compiled = torch.compile(model, dynamic=False, mode=compile_mode)
                fwd = lambda: compiled(**inputs, **kwargs)
            row.prefill_ms = 1e3 * timed(fwd, s.reps, s.device)
        else:
            # compile: the decode step is compiled and captured, the prompt compiled at its bucket's length
            # (GreedyDecoder); prefill_ms is then the time to the first token.
            dec = GreedyDecoder(model, s.batch, s.prompt_len + n + 1, cuda_graph=mode != "eager",
                                compile=mode == "compile", compile_mode=compile_mode)
            if mode == "eager":
                keep = dec.keep
                row.prefill_ms = 1e3 * timed(lambda: model(input_ids=ids, use_cache=True, **keep), s.reps, s.device)
            else:
                row.prefill_ms = 1e3 * timed(lambda: dec.prefill(ids), s.reps, s.device)
            if n > 1:
                if mode == "eager":
                    mask = torch.ones_like(ids)
                    gen = lambda k: model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                                   do_sample=False, pad_token_id=0)
                    step = (timed(lambda: gen(n), s.reps, s.device) - timed(lambda: gen(1), s.reps, s.device)) / (n - 1)
                else:
                    def run():
                        dec.prefill(ids)
                        _sync(s.device)
                        t = time.perf_counter()
                        dec.decode(n)
                        _sync(s.device)
                        return time.perf_counter() - t

                    run()  # capture / compile
                    step = statistics.median(run() for _ in range(s.reps)) / n
                row.decode_tok_s = s.batch / step
                row.step_gb = step_bytes(model, s.batch, s.prompt_len + n / 2) / 1e9
    if cuda:
        row.peak_gib = _gib(torch.cuda.max_memory_allocated())
    return row


def step_bytes(model: nn.Module, batch: int, filled: float) -> float:
    """Bytes one decode step must read: every weight except the input embedding table (one row per token;
    a table tied to the head is read whole), and `filled` positions of the KV cache for each sequence."""
    from zeroquant.models.hf import kv_cache_bytes
    from zeroquant.tools.evaluate import weight_bytes

    total = weight_bytes(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total + batch * kv_cache_bytes(model, filled, emb.weight.element_size())


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s, from a device-to-device copy of nbytes (each byte read once and
    written once), the best of CUDA-graph-timed repeats."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), rep=100, quantiles=[0.0])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * nbytes / (ms / 1e3)


def _file_gib(model: nn.Module) -> float:
    from zeroquant.formats.checkpoint import WEIGHTS_FILE, save_quantized

    with tempfile.TemporaryDirectory(prefix="zeroquant-bench-") as d:
        out = save_quantized(model, f"{d}/q")
        return _gib((out / WEIGHTS_FILE).stat().st_size)


PEERS = {"torchao": ["torchao-int8wo", "torchao-int4wo", "torchao-int8dq"]}
# tile_packed_to_4d: torchao's tinygemm INT4 kernel (its default "plain" format needs the separate mslk package)
PEER_CONFIGS = {"torchao-int4wo": {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"}}


def _peer_rows(peers: list[str]) -> list[str]:
    """The rows of the named peers (a peer's name for all its rows, or one row's name, e.g. torchao-int4wo);
    fails at once on an unknown name or a peer that is not installed."""
    import importlib.util

    rows = []
    for p in peers:
        owner = p if p in PEERS else next((k for k, v in PEERS.items() if p in v), None)
        if owner is None:
            names = [*PEERS, *(r for v in PEERS.values() for r in v)]
            raise ZeroQuantError(f"unknown --peer {p!r}; choose from {', '.join(names)}")
        if importlib.util.find_spec(owner) is None:
            raise ZeroQuantError(f"--peer {p}: {owner} is not installed (pip install {owner})")
        rows += PEERS[p] if p in PEERS else [p]
    return rows


def run(s: BenchSettings, progress: Callable[[str], None] = print,
        on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Every row for these settings; rows that fail keep their error in `note`. on_row(rows so far) is
    called after each row, so a run cut short keeps what it measured."""
    from zeroquant.api import quantize
    from zeroquant.core.config import resolve_config

    if (s.model_dir is None) == (s.config is None):
        raise ZeroQuantError("give MODEL_DIR, or --random-weights --config NAME (not both)")
    # Fail on bad input before building anything.
    configs = [resolve_config(p) for p in s.presets]
    if s.config is not None:
        random_config(s.config)
    elif not (Path(s.model_dir) / "config.json").is_file():
        raise ZeroQuantError(f"{s.model_dir} is not a Hugging Face model directory (no config.json)")
    cuda = s.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ZeroQuantError("--device cuda but CUDA is not available")
    peer_rows = _peer_rows(s.peers)
    modes = (["eager"] if s.eager else []) + (["graph"] if s.graph and cuda else []) + (
        ["compile"] if s.compile else [])
    if not modes:
        raise ZeroQuantError("no rows to run: eager, graph and compile rows are all off")
    fp = [(None, m, None) for m in modes] + [(None, "compile", cm) for cm in s.fp_compile_modes]
    plan = fp + [(c, m, None) for c in configs for m in modes] + [(p, "compile", None) for p in peer_rows]
    bandwidth = copy_bandwidth(s.device) if cuda else None
    rows = []
    for cfg, mode, compile_mode in plan:
        if cfg is None:
            name = "fp16" if cuda else "fp32"
        else:
            name = cfg if isinstance(cfg, str) else cfg.name
        label = f"{name} {mode}" + (f" {compile_mode}" if compile_mode else "")
        progress(f"[bench] {label} ...")
        model = build_model(s)
        file_gib = None
        try:
            if isinstance(cfg, str):
                from zeroquant.tools.peers import torchao_quantize

                model = torchao_quantize(model, cfg, dtype=torch.bfloat16, **PEER_CONFIGS.get(cfg, {}))
            elif cfg is not None:
                model = quantize(model, cfg, inplace=True, progress=False)
                if s.save_files and mode == modes[0]:
                    file_gib = _file_gib(model)
            row = measure(model, s, mode, compile_mode)
            row.file_gib = file_gib
            if bandwidth and row.step_gb and row.decode_tok_s:
                row.roofline = row.step_gb * 1e9 * row.decode_tok_s / s.batch / bandwidth
        except Exception as e:  # noqa: BLE001 - a failing row (ours or a peer library's) hides no other
            row = Row(mode, note=f"failed: {str(e).splitlines()[0][:120]}")
        row.variant, row.copy_gb_s = label, bandwidth and bandwidth / 1e9
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        del model
        _free()
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    """Markdown table with speed-ups against the first row (FP eager, when it ran) and the best FP row."""
    base = rows[0]
    fp = [r for r in rows if r.variant.startswith(("fp16", "fp32")) and r.decode_tok_s]
    best_fp = max(fp, key=lambda r: r.decode_tok_s) if fp else None
    fp_lat = [r for r in rows if r.variant.startswith(("fp16", "fp32")) and r.prefill_ms]
    best_lat = min(fp_lat, key=lambda r: r.prefill_ms) if fp_lat else None
    ratio = lambda a, b: None if not a or not b else a / b
    causal = any(r.decode_tok_s for r in rows)
    what = "TTFT ms" if causal else "forward ms"
    head = ["variant", what, "x fp eager", "x best fp"]
    if causal:
        head += ["decode tok/s", "x fp eager", "x best fp", "roofline"]
    head += ["resident GiB", "peak GiB", "weights GiB", "file GiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.variant, _fmt(r.prefill_ms), _fmt(ratio(base.prefill_ms, r.prefill_ms)),
                 _fmt(ratio(best_lat.prefill_ms if best_lat else None, r.prefill_ms))]
        if causal:
            cells += [_fmt(r.decode_tok_s, 1), _fmt(ratio(r.decode_tok_s, base.decode_tok_s)),
                      _fmt(ratio(r.decode_tok_s, best_fp.decode_tok_s if best_fp else None)), _fmt(r.roofline)]
        cells += [_fmt(r.resident_gib), _fmt(r.peak_gib), _fmt(r.weights_gib), _fmt(r.file_gib), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(s: BenchSettings) -> str:
    return torch.cuda.get_device_name() if s.device.startswith("cuda") else "cpu"


def describe(s: BenchSettings, rows: list[Row]) -> str:
    src = s.model_dir or f"random {s.config}" + (f" ({s.layers} layers)" if s.layers else "")
    shape = (f"batch {s.batch} x prompt {s.prompt_len}, {s.gen_len} new tokens" if any(r.decode_tok_s for r in rows)
             else f"batch {s.batch} x {s.prompt_len} tokens")
    return f"model: {src}  device: {device_name(s)}  {shape}, median of {s.reps}"


def to_json(rows: list[Row], s: BenchSettings) -> dict:
    import transformers

    return {"settings": asdict(s), "device": device_name(s),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "rows": [asdict(r) for r in rows]}
