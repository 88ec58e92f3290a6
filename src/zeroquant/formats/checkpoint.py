"""Save and load quantized models: safetensors (no pickle) + quantization.json beside config.json.

Layout of a saved directory:
    config.json, generation_config.json   the Hugging Face model config, untouched
    tokenizer files                        when a tokenizer was given or found beside the source model
    quantization.json                      our config, the model class, every quantized module
    model.safetensors                      float params + QuantLinear buffers (INT4 packed two per byte)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from zeroquant.api import quantized_modules
from zeroquant.core import quant as Q
from zeroquant.core.config import QuantConfig
from zeroquant.core.errors import PathError, ZeroQuantError
from zeroquant.core.state import QuantState, state_of
from zeroquant.formats.provenance import version
from zeroquant.models.fusion import fuse as fuse_ops
from zeroquant.models.hf import check_device, model_tokenizer
from zeroquant.models.hf_attention import use_kernel_attention
from zeroquant.nn.qlinear import QuantLinear

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
# 2: INT4 weights packed half-split in 64-channel chunks (the kernels' layout); 1: adjacent pairs.
FORMAT_VERSION = 2


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def quant_manifest(model: nn.Module) -> dict:
    state = state_of(model)
    if state is None:
        raise ZeroQuantError("model is not quantized: call zeroquant.quantize first")
    cfg = state.config
    modules = {
        name: {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
               "weight": vars(m.wq), "act": None if m.aq is None else vars(m.aq)}
        for name, m in quantized_modules(model).items()
    }
    return {
        "format": "zeroquant",
        "version": FORMAT_VERSION,
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "model_class": type(model).__name__,
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "modules": modules,
    }


FORMATS = ("zeroquant", "compressed-tensors")


# What saves write, besides `extra` files: a later save into the same checkpoint may replace or remove these;
# anything else in an output directory is someone else's and is never touched.
OWN_FILES = frozenset({
    QUANT_FILE, WEIGHTS_FILE, "config.json", "generation_config.json", "lkd_report.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
})


def _is_checkpoint(out: Path) -> bool:
    from zeroquant.formats.compressed_format import is_compressed_dir

    return (out / QUANT_FILE).exists() or is_compressed_dir(out)


def _replaceable(out: Path) -> bool:
    """An existing directory a save may write into without being told to: empty, or a checkpoint of either
    format (whose other files are kept)."""
    return out.is_dir() and (not any(out.iterdir()) or _is_checkpoint(out))


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(out_dir: str | os.PathLike, sources: tuple = (), overwrite: bool = False) -> Path:
    """Refuse, before any quantization work, an output a save must not or cannot write: the current
    directory (or one holding it), an input (`sources`) or a directory holding one, a path under a regular
    file, a non-empty directory that is no checkpoint (unless `overwrite`), or a place we may not write."""
    out = Path(out_dir).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ZeroQuantError(f"output {out_dir} is the current directory or holds it: name a new directory")
    for src in sources:
        src = Path(src).resolve()
        if out == src or out in src.parents:
            raise ZeroQuantError(f"output {out_dir} is the input {src} or holds it: name another directory")
    if out.exists() and not out.is_dir():
        raise PathError(f"output {out_dir} exists and is not a directory")
    if out.is_dir() and not overwrite and not _replaceable(out):
        raise ZeroQuantError(f"output {out} is not empty and not a zeroquant checkpoint: name a new directory, or "
                             "pass --overwrite (overwrite=True) to write into it (its other files are kept)")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise PathError(f"cannot create {out}: {base} is a file, not a directory")
    try:  # os.access says yes to root on a read-only mount: try it
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=base)).rmdir()
    except OSError as e:
        raise PathError(f"cannot write to {base}: {e.strerror or e}") from None
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(tmp: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600: give the directory and its files the modes any other
    file the user creates gets (0755 / 0644 under umask 022), so a shared model directory stays readable."""
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Temp directories of saves to `out` that were killed (SIGKILL, power loss) before they could clean up:
    ours by their exact name (".NAME.tmp-PID-XXXXXXXX" as mkdtemp completes it, the older ".NAME.tmp-XXXXXXXX"
    and ".NAME.old-PID"), holding plain files only, and no live process owns them."""
    import re

    name = re.compile(re.escape(f".{out.name}.") + r"(?:tmp-(?:(\d+)-)?[a-z0-9_]{8}|old-(\d+))")
    for p in out.parent.iterdir():
        m = name.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = m.group(1) or m.group(2)
        if pid is not None and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if all(f.is_file() and not f.is_symlink() for f in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)


def _move_into(out: Path, tmp: Path) -> None:
    """Put the new files in an existing `out` one by one, keeping every file a save did not write; files an
    earlier save of ours wrote that this one did not (quantization.json when the new checkpoint is
    compressed-tensors) are removed, so the directory reads as one checkpoint."""
    new = {f.name for f in tmp.iterdir()}
    stale = [f for f in out.iterdir() if f.name in OWN_FILES and f.name not in new and f.is_file()]
    ours = _is_checkpoint(out)  # before the moves: a directory --overwrite let us write into keeps its files
    last = ("config.json", QUANT_FILE)  # the files that say what the directory is go in last
    for name in sorted(new, key=lambda n: (n in last, n)):
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    for f in stale if ours else []:
        f.unlink()


def _write_atomically(out: Path, fill) -> Path:
    """Let fill(tmp) write a directory beside `out`, then rename it to `out` (or move its files into an
    existing `out`): a failure or an interrupt leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        fill(tmp)
        _apply_umask(tmp)
        if out.exists():
            _move_into(out, tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sort_metadata(file: Path) -> None:
    """safetensors writes __metadata__ (ours, and the names of tied tensors save_model dropped) from a Rust
    HashMap, in an order that changes from run to run: sort it in place (the same bytes in another order) so
    identical runs write identical files a user can check by hash."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")

        def dump(h: dict) -> bytes:  # serde_json's compact form, padded with spaces as safetensors pads
            return json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode().ljust(n)

        if not meta or dump(header) != raw:  # another writer's formatting: leave the file as written
            return
        f.seek(8)
        f.write(dump({**header, "__metadata__": dict(sorted(meta.items()))}))


def _write_hf_files(model: nn.Module, tmp: Path, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer, as the source model had them."""
    model.config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    tok = tokenizer if tokenizer is not None else model_tokenizer(model)
    if tok is not None:
        tok.save_pretrained(tmp)


def _skeleton(cls: type, hf_config, dtype: torch.dtype) -> nn.Module:
    """The architecture without weights: parameters on the meta device until a file's tensors take their
    place, so no random FP copy is ever allocated (buffers no file holds, such as rotary tables, are built
    for real: they are small)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(hf_config).to(dtype)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                   format: str = "zeroquant", overwrite: bool = False, provenance: dict | None = None) -> Path:
    """Write the quantized model to `out_dir` atomically (temp dir + rename): a failure leaves nothing.

    format: "zeroquant" (quantization.json + model.safetensors, read by zq.load_quantized) or
        "compressed-tensors" (what llm-compressor writes and vLLM, SGLang and transformers load; the same
        integers; refused, with nothing written, for schemes that format cannot spell).
    An existing `out_dir` is written into only if it is empty, a previous checkpoint of either format, or
    `overwrite` is set; files a save did not write are kept either way. The current directory and paths
    under a file are refused (check_output_dir).
    `extra` files (name -> JSON-able object) are written beside the model, e.g. a distillation report.
    `provenance` (zeroquant.formats.provenance: how the model was made) goes into quantization.json with the version.
    """
    if format not in FORMATS:
        raise ZeroQuantError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    out = check_output_dir(out_dir, overwrite=overwrite)
    manifest = quant_manifest(model)
    manifest["provenance"] = {"zeroquant": version(), **(provenance or {})}
    meta = next((n for n, t in model.state_dict().items() if t.is_meta), None)
    if meta is not None:  # a model built under init_empty_weights: nothing to write
        raise ZeroQuantError(f"{meta} is on the meta device (it holds no data): load real weights before saving")
    if format == "compressed-tensors":
        fill = _compressed_writer(model)
    else:
        def fill(tmp: Path) -> None:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "zeroquant": str(FORMAT_VERSION)})
            _sort_metadata(tmp / WEIGHTS_FILE)
            (tmp / QUANT_FILE).write_text(json.dumps(manifest, indent=2))

    def write(tmp: Path) -> None:
        _write_hf_files(model, tmp, tokenizer)
        fill(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))

    try:
        return _write_atomically(out, write)
    except OSError as e:  # disk full, quota, permissions: the temp directory is gone, `out` is as it was
        raise PathError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None


def _compressed_writer(model: nn.Module):
    """fill(tmp) for a compressed-tensors export; every check runs now, before a directory exists."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from zeroquant.formats.compressed_format import export_compressed

    qconfig, tensors = export_compressed(model, _skeleton(type(model), model.config, torch.float32))

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["architectures"] = [type(model).__name__]
        cfg["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))

    return fill


MANIFEST_KEYS = ("preset", "config", "model_class", "dtype", "modules")


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    f = p / QUANT_FILE
    if not p.is_dir():
        raise PathError(f"{p} is not a directory")
    if not f.exists():
        raise ZeroQuantError(f"{p} is not a zeroquant checkpoint (no {QUANT_FILE})")
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZeroQuantError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "zeroquant":
        raise ZeroQuantError(f"{f}: not a zeroquant manifest (no \"format\": \"zeroquant\")")
    version = manifest.get("version", 1)
    if version != FORMAT_VERSION:  # version 1 (INT4 in adjacent pairs) was never released: nothing reads it
        raise ZeroQuantError(f"{f}: format version {version!r}; this zeroquant reads version {FORMAT_VERSION}: "
                             "quantize the model again")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ZeroQuantError(f"{f}: missing {', '.join(missing)}")
    modules = manifest["modules"]
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        raise ZeroQuantError(f"{f}: \"modules\" must map module names to their specs, got {_kind(modules)}")
    for key in ("preset", "model_class", "dtype"):
        if not isinstance(manifest[key], str):
            raise ZeroQuantError(f"{f}: \"{key}\" must be a string, got {_kind(manifest[key])}")
    if not isinstance(manifest["config"], dict):
        raise ZeroQuantError(f"{f}: \"config\" must be an object, got {_kind(manifest['config'])}")
    return manifest


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """One line naming `where` and the tensor when a tensor has another shape or dtype than the model expects,
    or holds values its quantization cannot (_check_values) (unexpected names are reported with the missing
    ones, by _assign)."""
    expected = model.state_dict()
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            continue
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ZeroQuantError(f"{where}: {name} is {t.dtype} {list(t.shape)}, the model expects "
                                 f"{want.dtype} {list(want.shape)}")
        if not t.is_meta and t.numel():
            _check_values(model, name, t, where)


def _int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Stored integers a layer of `bits` accepts: the restricted range zeroquant writes, and -2^(b-1) as
    compressed-tensors writes symmetric values."""
    lo, hi = Q.qrange(bits, symmetric)
    return (lo - 1 if symmetric else lo), hi


def _check_values(model: nn.Module, name: str, t: torch.Tensor, where: str | Path) -> None:
    """Scales must be finite and positive, zero points integers in their bits' range, and unpacked integer
    weights within their bits: a file breaking these loads and runs, silently wrong."""
    prefix, _, buf = name.rpartition(".")
    if buf not in (*QuantLinear.SCALE_BUFFERS, "qweight"):
        return
    m = model.get_submodule(prefix)
    if not isinstance(m, QuantLinear):
        return
    if buf in QuantLinear.SCALE_BUFFERS and not torch.isfinite(t).all():
        raise ZeroQuantError(f"{where}: {name} holds NaN or infinite values")
    if buf in ("w_scale", "a_scale") and not (t > 0).all():
        raise ZeroQuantError(f"{where}: {name} holds zero or negative scales ({t.min().item():g})")
    if buf in ("w_zero", "a_zero"):
        spec = m.wq if buf == "w_zero" else m.aq
        lo, hi = Q.qrange(spec.bits, spec.symmetric)
        tf = t.float()
        if (tf != tf.round()).any() or tf.min() < lo or tf.max() > hi:
            raise ZeroQuantError(f"{where}: {name} holds zero points outside the integers {lo}..{hi} of "
                                 f"{spec.bits} bits (e.g. {tf[(tf < lo) | (tf > hi) | (tf != tf.round())][0]:g})")
    if buf == "qweight" and not m.packed and m.wq.bits < 8:
        lo, hi = _int_range(m.wq.bits, m.wq.symmetric)
        if t.min() < lo or t.max() > hi:
            raise ZeroQuantError(f"{where}: {name} holds integers in {t.min().item()}..{t.max().item()}, outside "
                                 f"{lo}..{hi} of the {m.wq.bits} bits its config says")


def _read_checked(model: nn.Module, file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors (read once), checked against the model (_check_tensors); nothing is loaded yet."""
    tensors = _read_file(file, device)
    _check_tensors(model, tensors, file)
    return tensors


def _retie(model: nn.Module) -> None:
    """A tied LM head and its embedding are stored once (under either name): loading by assignment filled
    only that one, so both names take it (transformers' own map of ties), then the model ties them again."""
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        names = [target, source]
        loaded = [model.get_parameter(n) for n in names if not model.get_parameter(n).is_meta]
        if loaded:
            for n in names:
                mod, _, attr = n.rpartition(".")
                setattr(model.get_submodule(mod), attr, loaded[0])
    model.tie_weights()


def _read_file(file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors, created on `device` directly (a CUDA load never holds the model in host memory)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ZeroQuantError(f"{file}: not a readable safetensors file ({e})") from None


def _hf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ZeroQuantError(f"cannot read {path / 'config.json'}: {e}") from None


def _model_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ZeroQuantError(f"transformers has no class {name}; upgrade transformers")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ZeroQuantError(f"{name} is not a transformers model class (e.g. LlamaForCausalLM)")
    return cls


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Put the file's tensors in place of the skeleton's meta tensors; fail naming what does not match."""
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    _retie(model)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise ZeroQuantError(f"{file} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")


def _zeroquant_skeleton(path: Path) -> tuple[nn.Module, dict]:
    """The model a zeroquant checkpoint describes, every tensor on the meta device, and its manifest."""
    from zeroquant.core.config import ActQuant, WeightQuant

    manifest = read_manifest(path)
    hf_config = _hf_config(path)
    try:
        cls = _model_class(manifest["model_class"])
    except ZeroQuantError as e:
        raise ZeroQuantError(f"{path / QUANT_FILE}: model_class: {e}") from None
    dtype = getattr(torch, str(manifest["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ZeroQuantError(f"{path / QUANT_FILE}: unknown dtype {manifest['dtype']!r}")
    model = _skeleton(cls, hf_config, dtype)
    for name, spec in manifest["modules"].items():
        try:
            act = None if spec["act"] is None else ActQuant(**spec["act"])
            with torch.device("meta"):
                ql = QuantLinear(spec["in"], spec["out"], spec["bias"], WeightQuant(**spec["weight"]), act, dtype)
            model.set_submodule(name, ql)
        except (KeyError, TypeError, AttributeError, ZeroQuantError) as e:
            raise ZeroQuantError(f"{path / QUANT_FILE}: module {name}: {type(e).__name__}: {e}") from None
    return model, manifest


def _manifest_config(path: Path, manifest: dict) -> QuantConfig:
    try:
        return QuantConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, AttributeError, ZeroQuantError) as e:
        raise ZeroQuantError(f"{path / QUANT_FILE}: config: {type(e).__name__}: {e}") from None


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise ZeroQuantError(f"{path} has no {WEIGHTS_FILE}")
    return file


def _load_zeroquant(path: Path, device: torch.device) -> tuple[nn.Module, QuantConfig]:
    model, manifest = _zeroquant_skeleton(path)
    cfg = _manifest_config(path, manifest)
    file = _weights_file(path)
    _assign(model, _read_checked(model, file, device), file)
    return model, cfg


# safetensors' dtype names
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors without reading its weights: meta tensors of the header's shapes and
    dtypes, but scales and zero points (small) read, to check their values. Fails in one line on a file that is
    empty, truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.rpartition(".")[2] in QuantLinear.SCALE_BUFFERS:
                    out[name] = f.get_tensor(name)
                    continue
                sl = f.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ZeroQuantError(f"{file}: {name} has dtype {sl.get_dtype()}, which zeroquant never writes")
                out[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError) as e:
        raise ZeroQuantError(f"{file}: not a readable safetensors file ({e})") from None
    return out


def _missing_unexpected(model: nn.Module, names: set[str]) -> tuple[list[str], list[str]]:
    """State-dict names the file lacks (a tied pair counts once) and file names the model has no place for."""
    expected = set(model.state_dict())
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    partners = {**ties, **{s: t for t, s in ties.items()}}
    missing = sorted(n for n in expected - names if partners.get(n) not in names)
    return missing, sorted(names - expected)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a zeroquant checkpoint without loading its weights: the manifest, and the weights file's header
    (every tensor present, with the shape and dtype the manifest implies) and its scales and zero points.
    Returns the manifest; raises ZeroQuantError naming what is damaged."""
    p = Path(path)
    model, manifest = _zeroquant_skeleton(p)
    _manifest_config(p, manifest)
    file = _weights_file(p)
    tensors = _header_tensors(file)
    _check_tensors(model, tensors, file)
    missing, unexpected = _missing_unexpected(model, set(tensors))
    if missing or unexpected:
        raise ZeroQuantError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return manifest


def _load_compressed(path: Path, device: torch.device) -> tuple[nn.Module, QuantConfig]:
    """A compressed-tensors checkpoint (llm-compressor's, or our export) on QuantLinear: the same integers."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from pydantic import ValidationError

    from zeroquant.api import linear_kinds
    from zeroquant.formats import compressed_format as CT

    cfg_file = path / "config.json"
    try:
        qc = QuantizationConfig.model_validate(CT.read_config(path))
    except ValidationError as e:
        raise ZeroQuantError(f"{cfg_file}: not a valid compressed-tensors config "
                             f"({e.errors()[0]['loc']}: {e.errors()[0]['msg']})") from None
    hf_config = _hf_config(path)
    cls = _model_class((getattr(hf_config, "architectures", None) or ["AutoModel"])[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ZeroQuantError(f"{path} has no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_file(f, device))
    where = str(files[0] if len(files) == 1 else path)
    # the float weights' own dtype (config.json's may predate a .half()); scales are float32 whatever it is
    floats = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(CT.SCALE_NAMES)}
    dtype = floats.pop() if len(floats) == 1 else getattr(hf_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _skeleton(cls, hf_config, dtype)
    matched: dict[str, tuple] = {}
    for group, scheme in qc.config_groups.items():
        rule, fmt = CT.scheme_rule(scheme, f"{cfg_file}: {group}")
        for name, module in match_named_modules(model, scheme.targets, qc.ignore or []):
            if not isinstance(module, nn.Linear) or name in matched:
                raise ZeroQuantError(f"{cfg_file}: {group} targets {name}, "
                                     + ("which is no nn.Linear" if name not in matched else "matched twice"))
            matched[name] = (module, rule, fmt)
    assigned: dict[str, torch.Tensor] = {}
    for name, (module, rule, fmt) in matched.items():
        with torch.device("meta"):
            ql = QuantLinear(module.in_features, module.out_features, module.bias is not None, rule.weight,
                             rule.act, dtype)
        model.set_submodule(name, ql)
        assigned.update(CT.import_buffers(name, ql, fmt, tensors, where))
    owned = tuple(f"{n}." for n in matched)
    for name, t in tensors.items():
        if not name.startswith(owned):
            assigned[name] = t.to(dtype) if t.is_floating_point() else t
    _check_tensors(model, assigned, where)
    _assign(model, assigned, Path(where))
    rules = {n: r for n, (_, r, _) in matched.items()}
    return model, CT.imported_config(rules, linear_kinds(model, allow_generic=True))


def checkpoint_format(path: str | os.PathLike) -> str:
    """"compressed-tensors" for a directory in that format without our quantization.json, else "zeroquant"
    (whose reader says what is wrong with anything else)."""
    from zeroquant.formats.compressed_format import is_compressed_dir

    p = Path(path)
    return "compressed-tensors" if not (p / QUANT_FILE).exists() and is_compressed_dir(p) else "zeroquant"


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", fuse: bool = True) -> nn.Module:
    """Rebuild a model saved by save_quantized (either format), or load a compressed-tensors checkpoint that
    another tool (llm-compressor) wrote, where its scheme is one zeroquant runs: INT8 or INT4 weights per
    channel or group, symmetric or with zero points, and dynamic token-wise or static INT8 activations. Its
    forward matches the model that was saved.

    fuse: apply zeroquant.models.fusion (norm -> quant, activation -> epilogue), as quantize() does.
    """
    p, dev = Path(path), torch.device(check_device(device))
    if checkpoint_format(p) == "compressed-tensors":
        model, cfg = _load_compressed(p, dev)
    else:
        model, cfg = _load_zeroquant(p, dev)
    model.to(dev)  # what no file holds (rotary tables) was built on the host
    for m in quantized_modules(model).values():
        m.scales_group_major()
    if fuse:
        fuse_ops(model)
        use_kernel_attention(model)
    model.zeroquant = QuantState(cfg)
    model.config._name_or_path = str(path)
    return model.eval()
