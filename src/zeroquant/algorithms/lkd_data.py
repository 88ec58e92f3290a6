"""Distillation data behind one interface: a text/jsonl file, text the FP model generates itself, or
random token ids."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant.algorithms.calib import Batch, model_device, tokenize_texts
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.hf import is_causal_lm, kv_cache_bytes
from zeroquant.tools.evaluate import read_text, sentences


def _file_texts(path: str) -> list[str]:
    text = read_text(path)
    if path.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ZeroQuantError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
        return out
    return sentences(text)


def _allowed_ids(tokenizer, vocab: int) -> torch.Tensor:
    """Every token id but the special ones: special tokens mid-sequence are out of distribution."""
    keep = torch.ones(vocab, dtype=torch.bool)
    for i in (tokenizer.all_special_ids if tokenizer is not None else []):
        if i < vocab:
            keep[i] = False
    return keep.nonzero().squeeze(1)


def _random_ids(n: int, seq_len: int, vocab: int, tokenizer, gen: torch.Generator) -> torch.Tensor:
    allowed = _allowed_ids(tokenizer, vocab)
    ids = allowed[torch.randint(0, allowed.numel(), (n, seq_len), generator=gen)]
    if tokenizer is not None and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return ids


def _generation_batch(model: nn.Module, seq_len: int, n: int, batch_size: int) -> int:
    """Sequences sampled at once: on a GPU as many as a quarter of its free memory holds the KV cache of (each
    decoding step costs about the same for 1 or 128 sequences); on the CPU `batch_size`."""
    device = model_device(model)
    if device.type != "cuda":
        return batch_size
    per_seq = kv_cache_bytes(model, seq_len)
    free, _ = torch.cuda.mem_get_info(device)
    return max(batch_size, min(n, int(free // 4 // per_seq)))


@torch.no_grad()
def _self_generated(model: nn.Module, tokenizer, n: int, seq_len: int, batch_size: int, gen: torch.Generator,
                    temperature: float = 1.0, top_p: float = 1.0, rounds: int = 8) -> torch.Tensor:
    """Text the FP model writes itself (the paper's data-free setting).

    Causal LMs sample autoregressively from their own distribution (temperature, nucleus top_p), starting
    from a random token. Encoders refine random ids: each round re-samples 30% of positions from the model's
    own token distribution (its MLM head when it has one, else the tied input embedding matrix as output layer).
    """
    device = model_device(model)
    emb = model.get_input_embeddings().weight
    vocab = emb.shape[0]
    banned = torch.ones(vocab, dtype=torch.bool)
    banned[_allowed_ids(tokenizer, vocab)] = False
    banned = banned.to(device)
    causal = is_causal_lm(model)
    if causal:
        batch_size = _generation_batch(model, seq_len, n, batch_size)
    out = []
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # generate() uses global RNG
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        if causal:
            start = torch.randint(0, vocab, (b, 1), generator=gen).to(device)
            ids = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                                 top_p=top_p, temperature=temperature, max_length=seq_len, min_length=seq_len,
                                 pad_token_id=0)
            out.append(ids.cpu())
            continue
        ids = _random_ids(b, seq_len, vocab, tokenizer, gen).to(device)
        for _ in range(rounds):
            o = model(input_ids=ids, output_hidden_states=True)
            logits = o.logits if getattr(o, "logits", None) is not None else o.hidden_states[-1] @ emb.t()
            logits = logits.float().masked_fill(banned, float("-inf"))
            probs = F.softmax(logits / temperature, dim=-1)
            sample = torch.multinomial(probs.flatten(0, 1).cpu(), 1, generator=gen).view(b, seq_len).to(device)
            pick = (torch.rand(b, seq_len, generator=gen) < 0.3).to(device)
            pick[:, 0] = pick[:, -1] = False
            ids = torch.where(pick, sample, ids)
        out.append(ids.cpu())
    return torch.cat(out)


def lkd_batches(source: str, model: nn.Module, tokenizer=None, num_sequences: int = 128, seq_len: int = 2048,
                batch_size: int = 8, seed: int = 0, temperature: float = 1.0, top_p: float = 1.0) -> list[Batch]:
    """Batches for distillation from `source`: a text/jsonl file path, "self" (sampled with `temperature`
    and nucleus `top_p`) or "random". Sequences are `seq_len` tokens, or as long as the model takes when
    that is shorter; a text file gives as many whole sequences as it holds, up to `num_sequences`."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq_len = min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    if source == "random":
        ids = _random_ids(num_sequences, seq_len, vocab, tokenizer, gen)
    elif source == "self":
        ids = _self_generated(model, tokenizer, num_sequences, seq_len, batch_size, gen, temperature, top_p)
    else:
        if not os.path.isfile(source):
            raise ZeroQuantError(f"LKD data must be a file, 'self' or 'random'; got {source!r}")
        if tokenizer is None:
            raise ZeroQuantError("LKD from a text file needs the model's tokenizer")
        texts = _file_texts(source)
        if is_causal_lm(model):  # pack the token stream into full windows
            stream = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
            n = min(num_sequences, stream.numel() // seq_len)
            if n == 0:
                raise ZeroQuantError(f"{source} has fewer than {seq_len} tokens")
            ids = stream[: n * seq_len].view(n, seq_len)
        else:
            return tokenize_texts(texts[:num_sequences], tokenizer, seq_len, batch_size)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]
