"""What every Triton launch asks of the device: its capability, SM count, and programmatic dependent launch.

Programmatic dependent launch (PDL, Hopper+): a kernel launched with it may start while the kernel before
it in the stream is still finishing; it blocks in `wait_for_producer` until that kernel has completed and
its writes are visible. What it saves is the launch and ramp-up gap between dependent kernels. The row and
attention kernels use it, each calling `wait_for_producer` before its first global load or store, so
nothing reads an input early or overwrites a buffer still being read.

The GEMMs are pickier: eager prefill was slower with PDL on them in most processes, so the TMA GEMM, the
GEMV and the Gluon small-M INT4 GEMM take it only while a CUDA graph is captured, where it helped; the tile
GEMM (decode at batch 16) never does, since it was slower with it there too (docs/history.md, kernel choices).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # griddepcontrol intrinsics (Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def device_info(device: int) -> tuple[int, int]:
    """(compute capability major, SM count): asked of the driver once per device, not on every launch."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.multi_processor_count


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def _pdl_ok(device: int) -> bool:
    # griddepcontrol is sm_90+ PTX: older GPUs compile the kernels without it.
    return gdc_wait is not None and device_info(device)[0] >= 9


def pdl_flags(t: torch.Tensor, graph_only: bool = False) -> dict:
    """Launch kwargs for a kernel taking a `PDL: tl.constexpr`, on t's device. graph_only: only while a CUDA
    graph is being captured (the GEMMs; see the module docstring)."""
    if not _pdl_ok(device_index(t)) or (graph_only and not torch.cuda.is_current_stream_capturing()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible, then let the next kernel
    launch (it waits in turn). Triggering after the wait, not before, keeps a chain of launched-but-waiting
    kernels from holding SMs the running one still needs."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
