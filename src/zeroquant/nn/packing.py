"""One GEMM for linears that read the same input (q, k, v projections; a decoder's gate and up projections).

pack() moves each buffer of the QuantLinears (qweight, scales, zero points, bias) into one allocation and
leaves each linear a view of its part, so nothing is stored twice: the kernels read the [N1 + N2 + ..., K]
weight, while every other path, the state dict and the parameter names see the linears as before.
A device move gives each view its own copy again; packed_buffers() then returns None and cached_pack() packs
anew. Interleaved float16 scales and zero points (weight_format.interleave) stay interleaved in the pack.
QuantLinear's state dict copies views out of a packed allocation, so checkpoints do not change.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zeroquant.kernels.weight_format import interleave, interleaved
from zeroquant.nn.qlinear import QuantLinear

# buffer, the dimension that holds the output channels in its storage, whether the buffer is a transposed
# view of that storage (scales and zero points are [N, G] views of [G, N] rows)
_LAYOUT = (("qweight", 0, False), ("w_scale", 1, True), ("w_zero", 1, True), ("w_row_scale", 0, False),
           ("bias", 0, False))


def packable(linears: list[QuantLinear]) -> bool:
    """Same weight and activation formats, input size and bias presence, and no epilogue activation."""
    first = linears[0]
    return all(
        isinstance(m, QuantLinear) and m.wq == first.wq and m.aq == first.aq and m.act is None
        and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
        and (m.w_zero is None) == (first.w_zero is None) for m in linears)


def _stored(t: torch.Tensor, flip: bool) -> torch.Tensor:
    return t.t() if flip else t


@torch.no_grad()
def pack(linears: list[QuantLinear]) -> None:
    """Give the linears' buffers one allocation each (in place of their own); scales and zero points that each
    linear keeps interleaved (weight_format.interleave) share one interleaved allocation."""
    bases = {name: None if linears[0]._buffers[name] is None
             else torch.cat([_stored(m._buffers[name], flip) for m in linears], dim) for name, dim, flip in _LAYOUT}
    first = linears[0]
    if bases["w_zero"] is not None and interleaved(first.w_scale.t(), first.w_zero.t()):
        bases["w_scale"], bases["w_zero"] = interleave(bases["w_scale"], bases["w_zero"])
    for name, dim, flip in _LAYOUT:
        if bases[name] is None:
            continue
        off = 0
        for m in linears:
            n = m._buffers[name].shape[0]
            m._buffers[name] = _stored(bases[name].narrow(dim, off, n), flip)
            off += n


def _base(bufs: list[torch.Tensor], dim: int, flip: bool) -> torch.Tensor | None:
    """The whole allocation the buffers are consecutive views of, or None if they are not (any more)."""
    parts = [_stored(b, flip) for b in bufs]
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    storage = parts[0].untyped_storage()
    # every element, or every other one: one half of an interleaved scale / zero point allocation
    step = parts[0].stride(-1) if parts[0].stride(-1) == 2 and flip else 1
    strides = [step * math.prod(shape[i + 1:]) for i in range(len(shape))]
    base = parts[0].new_empty(0).set_(storage, parts[0].storage_offset(), shape, strides)
    if storage.nbytes() != step * base.numel() * base.element_size() or parts[0].storage_offset() >= step:
        return None
    off = 0
    for p in parts:
        want = base.narrow(dim, off, p.shape[dim])
        if (p.data_ptr(), p.shape, p.stride()) != (want.data_ptr(), want.shape, want.stride()):
            return None
        off += p.shape[dim]
    return base


def packed_buffers(linears: list[QuantLinear]) -> dict[str, torch.Tensor | None] | None:
    """Each buffer's whole packed allocation in storage layout (qweight [N, K'], w_scale / w_zero [G, N],
    w_row_scale [N, 1], bias [N], N summed over the linears), or None if the linears are not packed."""
    bases = {}
    for name, dim, flip in _LAYOUT:
        bufs = [m._buffers[name] for m in linears]
        bases[name] = None if bufs[0] is None else _base(bufs, dim, flip)
        if bufs[0] is not None and bases[name] is None:
            return None
    return bases


def buffers_key(linears: list[QuantLinear]) -> tuple:
    """Where the linears' buffers live and how often they were written: a pack built from them is stale once
    this changes (a device move, packing, an in-place update)."""
    return tuple((b.data_ptr(), b._version) for m in linears for b in m._buffers.values() if b is not None)


def cached_pack(owner: nn.Module, linears: list[QuantLinear], x: torch.Tensor) -> dict[str, torch.Tensor | None] | None:
    """The linears' packed buffers (packed_buffers), packing them on first use. `owner`, the module that runs
    the packed GEMM, keeps them as its attribute `packed_buffers` (derived, never saved; it drops them on a
    device move: drop_pack) with `packed_key`, the buffers_key they were made under.

    None where the linears cannot run as one kernel GEMM on x (not packable, or not all on the kernels) or
    packing cannot happen: inside a CUDA-graph capture, or once a graph captured the linears
    unpacked (packing frees their own buffers). While torch.compile traces, the cached pack is used as it is
    and nothing is packed: checking that it is current reads storage addresses, which a graph cannot, and
    in-place updates of the linears' buffers write into it anyway."""
    if not (packable(linears) and all(m.uses_kernels(x) for m in linears)):
        return None
    cached = getattr(owner, "packed_buffers", None)
    if torch.compiler.is_compiling():
        return cached
    key = buffers_key(linears)
    if cached is not None and owner.packed_key == key:
        return cached
    packed = packed_buffers(linears)
    if packed is None:
        if (x.is_cuda and torch.cuda.is_current_stream_capturing()) or getattr(owner, "graphed_unpacked", False):
            owner.graphed_unpacked = True
            return None
        pack(linears)
        packed, key = packed_buffers(linears), buffers_key(linears)
    owner.packed_buffers, owner.packed_key = packed, key
    return packed


def drop_pack(owner: nn.Module) -> None:
    """Forget the owner's cached pack (cached_pack): on a device move, so the old allocations can be freed."""
    owner.__dict__.pop("packed_buffers", None)
