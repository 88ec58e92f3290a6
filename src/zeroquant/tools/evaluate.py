"""Evaluation: perplexity for causal LMs, fidelity to the FP model for encoders, and the report table."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeroquant.algorithms.calib import model_device, move, tokenize_texts
from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.models.hf import has_mlm_head, is_causal_lm


def read_text(path: str | os.PathLike) -> str:
    if not os.path.isfile(path):
        raise PathError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ZeroQuantError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                             "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if "\x00" in text:  # valid UTF-8 but no text: tokenizing it would calibrate or score on garbage
        raise ZeroQuantError(f"{path} holds NUL bytes: a binary file, not text")
    if not text.strip():
        raise ZeroQuantError(f"text file is empty: {path}")
    return text


def sentences(text: str, limit: int | None = None, min_words: int = 4) -> list[str]:
    """Sentences of a plain or WikiText-style file: paragraphs split at ' . ', headings (= x =) dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in line.split(" . "):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s if s.endswith(".") else s + " .")
                if limit is not None and len(out) >= limit:
                    return out
    return out


def max_positions(model: nn.Module, default: int = 1024) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity over non-overlapping windows of `seq_len` tokens (each window predicts seq_len-1 tokens)."""
    seq_len = min(seq_len or 1024, max_positions(model))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ZeroQuantError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    device = model_device(model)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
        x = windows[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "seq_len": seq_len}


@torch.no_grad()
def pooled_embeddings(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """Mean-pooled last hidden states over non-padding tokens (sentence-transformers style), float32."""
    device = model_device(model)
    out = []
    batches = tokenize_texts(texts, tokenizer, max_length, batch_size)
    for b in tqdm(batches, desc="embedding", disable=not progress, leave=False):
        b = move(b, device)
        h = model(**b, output_hidden_states=True).hidden_states[-1].float()
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


@torch.no_grad()
def mlm_loss(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128,
    mask_prob: float = 0.15, seed: int = 0, progress: bool = True,
) -> float:
    """Masked-LM loss with a fixed, seeded mask (the same positions for every model)."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    special = set(tokenizer.all_special_ids)
    for b in tqdm(tokenize_texts(texts, tokenizer, max_length, batch_size), desc="mlm", disable=not progress,
                  leave=False):
        ids = b["input_ids"]
        maskable = b["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(special)))
        chosen = (torch.rand(ids.shape, generator=gen) < mask_prob) & maskable
        if not chosen.any():
            continue
        inp = ids.masked_fill(chosen, tokenizer.mask_token_id)
        logits = model(**move({**b, "input_ids": inp}, device)).logits.float().cpu()
        total += F.cross_entropy(logits[chosen], ids[chosen], reduction="sum").item()
        count += int(chosen.sum())
    return total / max(count, 1)


def cosine_stats(ref: torch.Tensor, other: torch.Tensor) -> dict:
    cos = F.cosine_similarity(ref.double(), other.double(), dim=-1)
    return {"cos_mean": cos.mean().item(), "cos_std": cos.std().item(), "cos_min": cos.min().item(),
            "n": cos.numel()}


def _stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold t's bytes: t itself, or a tensor subclass's inner tensors (torchao's quantized
    weights, say), whose own numel x element size is the logical float size, not what is stored."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _stored_tensors(getattr(t, n))]
    return [t]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen, total = set(), 0
    for p in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        for t in _stored_tensors(p):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_megabytes(model: nn.Module) -> float:
    """weight_bytes in MB."""
    return weight_bytes(model) / 1e6


@dataclass
class EvalSettings:
    max_sentences: int = 2000
    max_tokens: int | None = None
    seq_len: int | None = None
    batch_size: int = 64
    progress: bool = True


def evaluate_model(model: nn.Module, tokenizer, text: str, settings: EvalSettings,
                   reference: dict | None = None) -> dict:
    """One row of the report. Encoders compare against `reference` (the FP row's embeddings)."""
    row: dict = {"weights_mb": weight_megabytes(model)}
    if is_causal_lm(model):
        row.update(perplexity(model, tokenizer, text, settings.seq_len, settings.max_tokens,
                              max(1, settings.batch_size // 16), settings.progress))
        return row
    sents = sentences(text, settings.max_sentences)
    if not sents:
        raise ZeroQuantError("the text file has no sentences of four or more words")
    emb = pooled_embeddings(model, tokenizer, sents, settings.batch_size, progress=settings.progress)
    row["_emb"] = emb
    ref = emb if reference is None else reference["_emb"]
    row.update(cosine_stats(ref, emb))
    if has_mlm_head(model):
        row["mlm_loss"] = mlm_loss(model, tokenizer, sents, settings.batch_size, progress=settings.progress)
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown table of report rows (keys starting with '_' are internal and skipped)."""
    if not rows:
        return ""
    cols = [k for k in rows[0] if not k.startswith("_")]
    for r in rows[1:]:
        cols += [k for k in r if not k.startswith("_") and k not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
