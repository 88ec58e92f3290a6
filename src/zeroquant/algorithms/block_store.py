"""Finished blocks on disk while a run goes on, so that a run that dies restarts from its last finished block.

A store is a directory: `run.json` (what the run is: model, preset, data, seed, ...) and one
`block-NNNNN.safetensors` per finished block (its tensors, and what the swap step recorded of it). A resumed run
replays the finished blocks instead of quantizing them again: their fold and observe steps run as before (so
smoothing folds the same scales and the hidden states are the ones an uninterrupted run carries), their swap step
is replaced by the saved block."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from zeroquant.core.errors import ZeroQuantError

RUN = "run.json"


class BlockStore:
    """`resume`: keep the blocks a run of the same `run` (a JSON-able description) left; otherwise start empty.
    Of several processes one writes (`writer`); the others only read what it wrote."""

    def __init__(self, path: str | os.PathLike, run: dict, resume: bool = False, writer: bool = True) -> None:
        self.path, self.run, self.writer = Path(path), json.loads(json.dumps(run)), writer
        if resume and self.path.exists():
            try:
                before = json.loads((self.path / RUN).read_text())
            except (OSError, ValueError):
                before = None
            if before != self.run:
                raise ZeroQuantError(f"--resume: {self.path} holds a run with other settings (or none); run "
                                     "without --resume to start over")
        elif writer:
            shutil.rmtree(self.path, ignore_errors=True)  # made on the first finished block
        self.done = 0
        while (self.path / self._name(self.done)).exists():
            self.done += 1

    @staticmethod
    def _name(k: int) -> str:
        return f"block-{k:05d}.safetensors"

    def save(self, k: int, block: nn.Module, record: dict | None) -> None:
        """Write finished block k (atomically: a file that exists is complete)."""
        if not self.writer:
            return
        if not self.path.exists():
            self.path.mkdir(parents=True)
            (self.path / RUN).write_text(json.dumps(self.run, indent=1, sort_keys=True))
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in block.state_dict().items()}
        tmp = self.path / (self._name(k) + ".tmp")
        save_file(tensors, tmp, metadata={"record": json.dumps(record)})
        os.replace(tmp, self.path / self._name(k))

    def load(self, k: int, fp_block: nn.Module, rebuild: Callable[[int, nn.Module], nn.Module]
             ) -> tuple[nn.Module, dict | None]:
        """Finished block k as it was saved and its record: `rebuild(k, fp_block)` makes a quantized block of the
        saved structure (round-to-nearest does), whose values the saved tensors then replace."""
        from safetensors import safe_open

        file = self.path / self._name(k)
        with safe_open(file, "pt") as f:
            record = json.loads((f.metadata() or {}).get("record", "null"))
        block = rebuild(k, fp_block)
        device = next(block.parameters()).device
        block.load_state_dict({n: t.to(device) for n, t in load_file(file).items()}, strict=True)
        return block, record

    def finished(self) -> int:
        """How many blocks the store holds (a run that dies leaves these for --resume)."""
        return sum(1 for _ in self.path.glob("block-*.safetensors")) if self.path.exists() else 0

    def close(self) -> None:
        """The run finished and its checkpoint is written: the store is no longer needed."""
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)


def store_dir(output: str | os.PathLike) -> Path:
    """Where the CLI keeps the finished blocks of a run writing `output`: a hidden sibling directory."""
    out = Path(output).resolve()
    return out.with_name(f".{out.name}.partial")
