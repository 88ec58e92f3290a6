"""QuantState: what zeroquant keeps on a model it quantized or loaded (`model.zeroquant`)."""

from __future__ import annotations

from dataclasses import dataclass

from zeroquant.core.config import QuantConfig


@dataclass
class QuantState:
    """The config the model was quantized with, whether the generic fallback (no adapter) found its linears,
    and what the data steps report: smoothing's alpha per site, distillation's row per block."""

    config: QuantConfig
    generic: bool = False
    smooth: list[dict] | None = None
    lkd: list[dict] | None = None


def state_of(model) -> QuantState | None:
    """The model's QuantState, None for a model zeroquant did not quantize or load."""
    state = getattr(model, "zeroquant", None)
    return state if isinstance(state, QuantState) else None
