"""Writing a checkpoint directory without harming a user's files: which files a save owns, refusing outputs it
must not write, atomic replacement through a temporary directory, and removing what a killed save left."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from zeroquant.core.errors import PathError, ZeroQuantError

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


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


def write_atomically(out: Path, fill) -> Path:
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
