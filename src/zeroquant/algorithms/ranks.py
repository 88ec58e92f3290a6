"""Several processes quantizing one model together (torchrun; NCCL on GPUs, gloo on CPU): which calibration
batches each holds, and the reductions that make every process reach the one-process result. Every process runs
the same blocks in the same order; only the batches (and their hidden states) are split."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroquant.core.errors import ZeroQuantError


@dataclass(frozen=True)
class Ranks:
    """This process's place among `world` processes (one process: rank 0 of 1, and every reduction is a no-op)."""

    rank: int = 0
    world: int = 1

    def holder(self, i: int) -> int:
        """The process that holds global batch i (round robin)."""
        return i % self.world

    def mine(self, n: int) -> list[int]:
        """The global indices of the batches this process holds."""
        if n < self.world:
            raise ZeroQuantError(f"{n} calibration batch(es) for {self.world} processes: give each at least one")
        return [i for i in range(n) if self.holder(i) == self.rank]

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """`t` summed ("sum"), or its element-wise "max" / "min", over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t

    def gather(self, obj: object) -> list[object]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object, src: int) -> object:
        """Process `src`'s `obj`, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def share_grads(self, params: list[torch.Tensor], src: int) -> None:
        """Process `src`'s gradients (None where it has none) on every process: the step that follows is then
        the same everywhere."""
        if self.world == 1:
            return
        has = self.broadcast([p.grad is not None for p in params], src)
        for p, h in zip(params, has, strict=True):
            if h:
                if self.rank != src:
                    p.grad = torch.empty_like(p)
                dist.broadcast(p.grad, src)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_from_env() -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK): NCCL when CUDA is here (each
    process on its own GPU), gloo otherwise. One process without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


ONE = Ranks()  # a single process
