"""Run models with as little Python per step as possible: static KV cache + CUDA-graph replays.

Hugging Face's eager decode step launches several hundred small kernels from Python; at batch 1 the GPU
waits on the CPU, so faster GEMMs alone change little. GreedyDecoder keeps the KV cache in fixed
buffers (transformers.StaticCache) and captures one decode step, including the argmax and the update of
its own input token and position, into a CUDA graph: each new token is then one graph replay.
GraphedForward does the same for a fixed-shape forward (encoders). Both work for float and quantized
models alike, so a benchmark can separate what the graph buys from what quantization buys.

compile=True puts torch.compile around the forward inside the same loop: inductor fuses the float ops
between the GEMMs (norms, rotary embedding, residual adds, attention glue), zeroquant's kernels stay as they
are (they are custom ops: zeroquant.kernels.ops), and the CUDA graph then captures the compiled step. The
prompt forward is compiled too, for lengths padded up to a bucket (prompt_bucket), so a new prompt length
compiles again only when it falls into a new bucket; on CUDA each bucket's compiled prompt is a CUDA graph as
well (the time to the first token of a short prompt is otherwise the Python launch of every kernel).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import StaticCache


def last_logits_only(model: nn.Module) -> dict:
    """Forward kwargs asking for the last position's logits only, where the model takes that argument
    (generation needs no more)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def compiled(fn, mode: str | None = None, backend: str = "inductor"):
    """torch.compile(fn) for fixed shapes. With inductor in its default mode, it rounds to fp16/bf16 wherever
    eager PyTorch does (emulate_precision_casts): a quantized model re-quantizes every activation, so an
    intermediate kept in float32 instead moves INT8 codes and, at times, a greedy token."""
    options = {"emulate_precision_casts": True} if backend == "inductor" and mode is None else None
    return torch.compile(fn, dynamic=False, mode=mode, backend=backend, options=options)


def prompt_bucket(length: int, max_len: int) -> int:
    """The compiled prompt's length for a prompt of `length` tokens: the next power of two from 16, at most
    max_len. Padding costs at most 2x the prompt's tokens; each bucket is one compile."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


def _warm_and_capture(fn, warmup: int = 2, pool=None) -> torch.cuda.CUDAGraph:
    """Run fn a few times on a side stream (first calls autotune and compile kernels; a graph cannot
    capture that), then capture one call (into memory pool `pool`, shared with other graphs when given)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


class _PromptGraph:
    """One prompt bucket's forward as a CUDA graph over fixed input buffers: forward(ids [B, padded], positions,
    last [1]) -> the next token [B]. The graph resets the cache first (so its own warm-ups never run past the
    cache's end) and last sets every cache layer's write counter to the prompt's true length (decode then
    overwrites the padding's entries)."""

    def __init__(self, forward, cache, lengths, batch: int, padded: int, device: torch.device, pool) -> None:
        self.ids = torch.zeros(batch, padded, dtype=torch.long, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        pos = torch.arange(padded, device=device)
        self.out = None

        def run():
            cache.reset()
            self.out = forward(self.ids, pos, self.last)
            counters = lengths()
            if counters:
                torch._foreach_copy_(counters, [self.last[0] + 1] * len(counters))

        self.graph = _warm_and_capture(run, pool=pool)

    def __call__(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        self.ids[:, : ids.shape[1]].copy_(ids)
        self.ids[:, ids.shape[1]:].zero_()
        self.last.fill_(last)
        self.graph.replay()
        return self.out


class GreedyDecoder:
    """Greedy generation of a causal LM with a static KV cache; each decode step is one CUDA-graph replay
    on CUDA (cuda_graph=True), an eager forward otherwise. No stopping criteria: always n tokens."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, cuda_graph: bool = True,
                 compile: bool = False, compile_mode: str | None = None, backend: str = "inductor") -> None:
        self.model, self.batch, self.max_len = model, batch_size, max_len
        self._step_forward = compiled(self._next_token, compile_mode, backend) if compile else self._next_token
        self._prompt_forward = compiled(self._prompt_token, compile_mode, backend) if compile else None
        self._packed = False  # compile: one eager prompt first, which packs the linears run as one GEMM
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the token being fed
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # its position
        # A full-length all-ones mask: with it no model infers positions from the cache length (a sync).
        self.mask = torch.ones(batch_size, max_len, dtype=torch.long, device=device)
        self.keep = last_logits_only(model)
        self.use_graph = cuda_graph and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self._prompt_graphs: dict[int, _PromptGraph] = {}  # by bucket; all graphs share one memory pool
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        self.length = 0

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep: dict) -> torch.Tensor:
        """The logits of tokens `ids` at positions `pos`, written into the static cache."""
        return self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos.expand(ids.shape[0], -1),
                          past_key_values=self.cache, cache_position=pos, use_cache=True, **keep).logits

    def _next_token(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, pos, self.keep)[:, -1].argmax(-1)

    def _prompt_token(self, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The token after position `last` [1] of a right-padded prompt: the padding's own cache entries lie
        past the prompt, where the causal mask hides them until decode overwrites them. Its own function, so
        the prompt's buckets and the decode step count against separate torch.compile recompile limits."""
        if self.keep:
            return self._forward(ids, pos, {"logits_to_keep": last})[:, -1].argmax(-1)
        return self._forward(ids, pos, {}).index_select(1, last)[:, -1].argmax(-1)

    def _cache_lengths(self) -> list[torch.Tensor]:
        """The cache layers' own write positions, where they keep one (transformers >= 5: each new entry goes
        there, whatever cache_position says)."""
        return [t for t in (getattr(la, "cumulative_length", None) for la in self.cache.layers) if torch.is_tensor(t)]

    def _step(self) -> None:
        nxt = self._step_forward(self.ids, self.pos)
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, P] from an empty cache; returns the first generated token [B]."""
        b, p = ids.shape
        if b != self.batch or p >= self.max_len:
            raise ValueError(f"prompt {tuple(ids.shape)} does not fit batch {self.batch}, max_len {self.max_len}")
        if self._prompt_forward is None or not self._packed:
            # compile: this first eager pass packs the linears run as one GEMM (a traced forward cannot)
            self.cache.reset()
            nxt = self._next_token(ids, torch.arange(p, device=ids.device))
            self._packed = True
        if self._prompt_forward is not None:
            nxt = self._compiled_prompt(ids)
        self.ids.copy_(nxt[:, None])
        self.pos.fill_(p)
        self.length = p
        return nxt

    def _compiled_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """The compiled prompt forward at the prompt's bucket length (right-padded): a CUDA-graph replay of that
        bucket on CUDA (its graph captured on first use), a direct call otherwise."""
        p = ids.shape[1]
        padded = prompt_bucket(p, self.max_len)
        if self.use_graph:
            if padded not in self._prompt_graphs:
                self._prompt_graphs[padded] = _PromptGraph(self._prompt_forward, self.cache, self._cache_lengths,
                                                           self.batch, padded, ids.device, self._pool)
            return self._prompt_graphs[padded](ids, p - 1).clone()  # graph memory: the decode graph may reuse it
        self.cache.reset()
        last = torch.full((1,), p - 1, dtype=torch.long, device=ids.device)
        nxt = self._prompt_forward(torch.nn.functional.pad(ids, (0, padded - p)),
                                   torch.arange(padded, device=ids.device), last)
        for t in self._cache_lengths():  # the next token goes right after the prompt, not after its padding
            t.fill_(p)
        return nxt

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n more tokens [B, n], each fed back as the next input."""
        if self.length + n > self.max_len:
            raise ValueError(f"{self.length} + {n} tokens exceed max_len {self.max_len}")
        out = torch.empty(self.batch, n, dtype=torch.long, device=self.ids.device)
        if self.use_graph and self.graph is None and n:
            # Warm-up steps write the same cache entries the real steps will (no more of them than the cache has
            # left); rewind every position counter (ours and the cache layers' own) after them.
            counters = [self.ids, self.pos, *self._cache_lengths()]
            saved = [t.clone() for t in counters]
            self.graph = _warm_and_capture(self._step, warmup=min(2, self.max_len - self.length), pool=self._pool)
            for t, v in zip(counters, saved, strict=True):
                t.copy_(v)
        for i in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            out[:, i] = self.ids[:, 0]
        self.length += n
        return out

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """n new tokens [B, n] after the prompt: what model.generate(greedy, min_new_tokens=n) returns."""
        first = self.prefill(ids)
        return torch.cat([first[:, None], self.decode(n - 1)], dim=1)


class GraphedForward:
    """model(**inputs) for one fixed set of input shapes as a CUDA-graph replay; compile=True: of the model
    compiled by torch.compile (compile_mode: its mode).

    The returned output lives in the graph's memory and is overwritten by the next call.
    """

    def __init__(self, model: nn.Module, compile: bool = False, compile_mode: str | None = None,
                 **example: torch.Tensor) -> None:
        self.model = model
        self.inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in example.items()}
        self.out = None
        forward = compiled(model, compile_mode) if compile else model
        if compile:
            with torch.no_grad():
                model(**self.inputs)  # eager first: packs the linears that run as one GEMM (a traced forward cannot)

        def run():
            self.out = forward(**self.inputs)

        with torch.no_grad():
            self.graph = _warm_and_capture(run)

    def __call__(self, **inputs: torch.Tensor):
        for k, v in inputs.items():
            if torch.is_tensor(v):
                self.inputs[k].copy_(v)
        self.graph.replay()
        return self.out
