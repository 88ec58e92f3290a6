"""What a user would run instead, for rows beside ours in the same run: torchao's quantization of the same
block linears (an optional dependency: `pip install torchao`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from zeroquant.api import linear_kinds
from zeroquant.core.errors import ZeroQuantError

# row name -> torchao config class: INT8 dynamic activations x INT8 weights, INT8 / INT4 weight-only
TORCHAO = {"torchao-int8dq": "Int8DynamicActivationInt8WeightConfig", "torchao-int8wo": "Int8WeightOnlyConfig",
           "torchao-int4wo": "Int4WeightOnlyConfig"}


def torchao_quantize(model: nn.Module, scheme: str, allow_generic: bool = False, dtype: torch.dtype | None = None,
                     **config) -> nn.Module:
    """A copy of `model` (cast to `dtype` when given) whose block linears (the ones zeroquant quantizes;
    embeddings and head stay FP) are quantized by torchao's `scheme` (a key of TORCHAO; `config`: the config
    class's arguments)."""
    if scheme not in TORCHAO:
        raise ZeroQuantError(f"unknown torchao scheme {scheme!r}; choose one of {', '.join(TORCHAO)}")
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ZeroQuantError("torchao is not installed (pip install torchao)") from None
    names = set(linear_kinds(model, allow_generic))
    q = copy.deepcopy(model).to(dtype) if dtype is not None else copy.deepcopy(model)
    tq.quantize_(q, getattr(tq, TORCHAO[scheme])(**config), filter_fn=lambda m, fqn: fqn in names)
    return q
