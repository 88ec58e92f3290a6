"""A floating-point model that is never materialised whole: its skeleton on the meta device, everything outside
the blocks (embeddings, final norm, head) read at once, and each block's weights read from the checkpoint's
safetensors shards when the block's turn comes (LazyBlocks, the block runner's source)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.adapters import arch_for, blocks_name, get_blocks
from zeroquant.models.hf import (
    _load_tokenizer,
    check_loading_info,
    model_class,
    one_line,
    read_config,
    refuse_quantized_dir,
)

INDEX = "model.safetensors.index.json"


def has_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` is a model directory whose weights are safetensors (one file or an indexed set of shards)."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX).exists() or (p / "model.safetensors").exists())


def _open(file: Path):
    from safetensors import SafetensorError

    try:
        return safe_open(file, "pt")
    except (OSError, SafetensorError) as e:
        raise ZeroQuantError(f"cannot load the model in {file.parent}: {file.name}: {one_line(e)}") from None


class ShardedWeights:
    """A model directory's tensors by name, each read from its shard on request (memory-mapped: nothing else
    of the file is read). `close()` unmaps the shards read so far: their pages would otherwise stay in the
    process's resident memory until the end."""

    def __init__(self, path: Path) -> None:
        if (path / INDEX).exists():
            try:
                names = json.loads((path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ZeroQuantError(f"{path / INDEX}: not a safetensors index ({one_line(e)})") from None
            self.files = {n: path / f for n, f in names.items()}
        else:
            self.files = dict.fromkeys(_open(path / "model.safetensors").keys(), path / "model.safetensors")
        self.open: dict[Path, object] = {}
        self.renames: dict[str, str] = {}  # the model's name -> the checkpoint's, see checkpoint_renames

    def find(self, name: str, prefix: str) -> str | None:
        """The checkpoint's name for the model's tensor `name`: itself, or without/with the base model's prefix
        (a checkpoint of the base model read into a model with a head, or the other way round), each as saved
        under the name transformers renames on loading if `renames` holds one."""
        for n in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            n = self.renames.get(n, n)
            if n in self.files:
                return n
        return None

    def _file(self, name: str):
        file = self.files[name]
        if file not in self.open:
            self.open[file] = _open(file)
        return self.open[file]

    def read(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def close(self) -> None:
        self.open.clear()


def checkpoint_renames(model: nn.Module, keys: Iterable[str], path: str | os.PathLike) -> dict[str, str]:
    """{the model's name: the checkpoint's name} for each checkpoint tensor that transformers loads under another
    name. transformers 5 renames keys on loading through its conversion mapping (GPT-NeoX's saved
    `embed_out.weight` is the model's `lm_head.weight`), so a reader that looks tensors up by the model's names
    must apply the same renames, taken from transformers itself to stay in step with it. Only plain renames: a
    checkpoint tensor that transformers would merge, split or otherwise change into one the model holds is
    refused, since reading it unchanged would give a wrong model. Empty on a transformers without the mapping
    (before 5 it loads keys as saved)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = {n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    base = getattr(model, "base_model_prefix", "")

    def held(n: str) -> bool:
        return n in names or n.removeprefix(base + ".") in names or f"{base}.{n}" in names

    renames, converted = {}, []
    # transformers renames keys in sorted order, and some renames (GroupWeightRename) depend on the keys seen before
    for key in sorted(keys):
        new = key
        for t in renamings:
            new, _ = t.rename_source_key(new)
        for t in converters:
            target, pattern = t.rename_source_key(new)
            if pattern is not None:
                if held(target):
                    converted.append(f"{key} -> {target}")
                break
        if new != key:
            renames[new] = key
    if converted:
        raise ZeroQuantError(f"{path}: transformers converts {len(converted)} checkpoint tensor(s) on loading, not "
                             f"only renames them ({converted[0]}{', ...' if len(converted) > 1 else ''}): load this "
                             "model with load_fp_model (in memory), not lazily")
    return renames


def _return_freed_memory() -> None:
    """Hand the heap memory freed with an FP block back to the system (glibc keeps freed chunks below its mmap
    threshold for reuse, so a block-by-block run would otherwise hold every block's worth of memory)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _set(module: nn.Module, name: str, value: torch.Tensor) -> tuple[nn.Module, str]:
    """Put `value` in place of the parameter or buffer `name` of `module`; returns (its owner, its attribute)."""
    owner, _, attr = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    if attr in m._parameters:
        m._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        m._buffers[attr] = value
    return m, attr


class LazyBlocks:
    """The block runner's source for a lazily loaded model: block k's weights read from the shards onto the
    compute device for its turn; the finished block kept in host memory, the FP one released."""

    def __init__(self, blocks: nn.ModuleList, prefix: str, base: str, weights: ShardedWeights,
                 dtype: torch.dtype) -> None:
        self.blocks, self.prefix, self.base, self.weights, self.dtype = blocks, prefix, base, weights, dtype

    def __len__(self) -> int:
        return len(self.blocks)

    def take(self, k: int, device: torch.device) -> nn.Module:
        block = self.blocks[k]
        self.loaded = []
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if not t.is_meta:
                continue
            full = f"{self.prefix}.{k}.{name}"
            key = self.weights.find(full, self.base)
            if key is None:
                raise ZeroQuantError(f"the checkpoint lacks {full} (a damaged or partial checkpoint?)")
            value = self.weights.read(key)
            if value.shape != t.shape:
                raise ZeroQuantError(f"{full}: the checkpoint holds {tuple(value.shape)}, the config says "
                                     f"{tuple(t.shape)}")
            self.loaded.append(_set(block, name, value.to(device, self.dtype if value.is_floating_point() else None)))
        self.weights.close()
        return block.to(device)

    def give(self, k: int, old: nn.Module, new: nn.Module) -> None:
        """Keep the finished block in host memory and release every FP tensor it no longer uses (others, such as
        the steps' list of targets, may still hold the replaced modules)."""
        kept = {id(t) for t in [*new.parameters(), *new.buffers()]}
        for m, attr in self.loaded:
            t = m._parameters.get(attr, m._buffers.get(attr))
            if t is not None and id(t) not in kept:
                _set(m, attr, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self.blocks[k] = new.to("cpu")
        _return_freed_memory()


def _check_complete(model: nn.Module, weights: ShardedWeights, prefix: str, base: str, path) -> None:
    """Refuse, before any work, a checkpoint that lacks a tensor the model needs or holds one of another shape
    (from the shards' headers: no tensor is read)."""
    missing, mismatched, used = [], [], set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        key = weights.find(name, base)
        used.add(key)
        if not t.is_meta:
            continue
        if key is None:
            missing.append(name)
        elif name.startswith(prefix + ".") and weights.shape(key) != tuple(t.shape):
            mismatched.append(name)
    check_loading_info(path, {"missing_keys": missing, "mismatched_keys": mismatched,
                              "unexpected_keys": sorted(set(weights.files) - used)})


def open_lazy(path: str | os.PathLike, device: str = "cpu", allow_generic: bool = False,
              tokenizer: bool = True) -> tuple[nn.Module, object, LazyBlocks]:
    """(model, tokenizer or None, LazyBlocks) for a Hugging Face directory of safetensors weights: the model's
    blocks stay on the meta device until LazyBlocks reads them; everything else is read now, in float16 when
    `device` is CUDA and float32 otherwise (as load_fp_model)."""
    from accelerate import init_empty_weights

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = Path(path)
    refuse_quantized_dir(d)
    config = read_config(d, path, {})
    arch_for(config.model_type, allow_generic)
    tok = _load_tokenizer(d, path, {}) if tokenizer else None
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    with init_empty_weights():
        cls = model_class(config)
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    # Buffers computed at init (rotary frequencies, GPT-J's sin/cos table) stay as computed in float32, as
    # from_pretrained leaves them: cast to float16 they shift every rotary angle. Checkpoint tensors are read
    # in dtype below.
    computed = [(name, b) for name, b in model.named_buffers() if not b.is_meta]
    model.to(dtype)
    for name, b in computed:
        _set(model, name, b)
    weights = ShardedWeights(d)
    weights.renames = checkpoint_renames(model, weights.files, path)
    blocks = get_blocks(model, allow_generic)
    prefix = blocks_name(model, blocks)
    base = getattr(model, "base_model_prefix", "")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(prefix + ".") or not t.is_meta:
            continue
        key = weights.find(name, base)
        if key is not None:
            value = weights.read(key)
            _set(model, name, value.to(dtype) if value.is_floating_point() else value)
    model.tie_weights()
    _check_complete(model, weights, prefix, base, path)
    weights.close()
    return model.eval(), tok, LazyBlocks(blocks, prefix, base, weights, dtype)
