"""Turn whatever the user passes as calibration / distillation data into model-ready batches."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.hf import model_tokenizer

Batch = dict[str, torch.Tensor]


def tokenize_texts(texts: Sequence[str], tokenizer, seq_len: int, batch_size: int) -> list[Batch]:
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=seq_len)
        batches.append(dict(enc))
    return batches


def to_batches(
    data,
    tokenizer=None,
    model: nn.Module | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[Batch]:
    """Normalise calibration data into a list of {"input_ids", ["attention_mask", ...]} batches.

    Accepts the path of a text file (its sentences), a list of strings (tokenized with `tokenizer`, else with
    the model's own tokenizer when the model was loaded from a directory), a tensor of integer token ids
    ([T] or [B, T]), or a list of already tokenized batches (dicts or id tensors); anything else, and ids
    outside the model's vocabulary, are refused.
    """
    batches = _to_batches(data, tokenizer, model, seq_len, batch_size)
    vocab = _vocab_size(model)
    for b in batches:
        _check_ids(b.get("input_ids"), vocab)
    return batches


def _vocab_size(model: nn.Module | None) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return getattr(emb, "num_embeddings", None)


def _check_ids(ids, vocab: int | None) -> None:
    """Token ids must be an integer tensor within the vocabulary: floats would be truncated silently, and an
    id past the embedding table is an IndexError deep inside the model."""
    if not isinstance(ids, torch.Tensor):
        raise ZeroQuantError(f"calibration input_ids must be a tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ZeroQuantError(f"calibration token ids must be integers, got a {ids.dtype} tensor")
    if ids.numel() and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
        raise ZeroQuantError(f"calibration token ids span {ids.min().item()}..{ids.max().item()}; the model's "
                             f"vocabulary is 0..{vocab - 1 if vocab is not None else '?'}")


def _to_batches(data, tokenizer, model, seq_len: int, batch_size: int) -> list[Batch]:
    if data is None:
        raise ZeroQuantError("no calibration data given")
    if isinstance(data, (str, os.PathLike)):  # iterating a path would calibrate on its characters
        if not os.path.isfile(data):
            raise ZeroQuantError(f"calibration data {str(data)!r} is no file: pass a file path, a list of texts "
                                 "(a single text as [text]), token ids or batches")
        from zeroquant.tools.evaluate import read_text, sentences

        data = sentences(read_text(data))
    if isinstance(data, torch.Tensor):
        _check_ids(data, None)
        ids = data.long()
        if ids.dim() == 1:
            n = ids.numel() // seq_len
            if n == 0:
                raise ZeroQuantError(f"need at least {seq_len} token ids, got {ids.numel()}")
            ids = ids[: n * seq_len].reshape(n, seq_len)
        return [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]
    if isinstance(data, Mapping) and "input_ids" in data:  # one batch, e.g. a tokenizer's output
        data = [dict(data)]
    if not isinstance(data, Iterable) or isinstance(data, (bytes, Mapping)):
        raise ZeroQuantError(f"calibration data of type {type(data).__name__}: pass a file path, a list of texts, "
                             "token ids or batches")
    data = list(data)
    if not data:
        raise ZeroQuantError("calibration data is empty")
    if all(isinstance(d, str) for d in data):
        tok = tokenizer or (model_tokenizer(model) if model is not None else None)
        if tok is None:
            raise ZeroQuantError("calibration data is text: pass tokenizer=... (the model has no saved tokenizer)")
        texts = [t for t in data if t.strip()]
        if not texts:
            raise ZeroQuantError("calibration texts are all empty")
        return tokenize_texts(texts, tok, seq_len, batch_size)
    out = []
    for d in data:
        if isinstance(d, torch.Tensor):
            out.append({"input_ids": d if d.dim() == 2 else d.unsqueeze(0)})
        elif isinstance(d, dict) and "input_ids" in d:
            out.append(dict(d))
        else:
            raise ZeroQuantError(f"unsupported calibration item of type {type(d).__name__}")
    return out


def split_batch(batch: Batch) -> list[Batch]:
    """A batch of two or more sequences as two batches (the first holding the extra one); one sequence stays."""
    n = batch["input_ids"].shape[0] if batch["input_ids"].dim() > 1 else 1
    if n < 2:
        return [batch]
    half = (n + 1) // 2

    def rows(sl: slice) -> Batch:
        return {k: v[sl] if isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[0] == n else v
                for k, v in batch.items()}

    return [rows(slice(0, half)), rows(slice(half, n))]


def move(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
