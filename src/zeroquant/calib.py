"""Turn whatever the user passes as calibration / distillation data into model-ready batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ZeroQuantError
from .hf import model_tokenizer

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

    Accepts a list of strings (tokenized with `tokenizer`, else with the model's own tokenizer when the
    model was loaded from a directory), a tensor of token ids ([T] or [B, T]), or a list of already
    tokenized batches (dicts or id tensors).
    """
    if data is None:
        raise ZeroQuantError("no calibration data given")
    if isinstance(data, torch.Tensor):
        ids = data.long()
        if ids.dim() == 1:
            n = ids.numel() // seq_len
            if n == 0:
                raise ZeroQuantError(f"need at least {seq_len} token ids, got {ids.numel()}")
            ids = ids[: n * seq_len].reshape(n, seq_len)
        return [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]
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


def move(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
