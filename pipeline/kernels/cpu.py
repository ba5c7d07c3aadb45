"""The CPU kernel (cpu_attn.c): a layer's output, row statistics, head-mean map and, when asked,
probabilities, in one pass over each attention row.

The C file ships with the package and is compiled here once per machine with the system's C
compiler (`$CC`, else cc), `-O3 -march=native -fopenmp`, into the user's cache
(`$ATTNPIPE_CACHE/kernels`, default ~/.cache/attnpipe/kernels), under a name
that hashes the source, the flags, the compiler and the CPU's features: a changed file or a
different machine builds anew. The build goes to a temporary name and is renamed into place,
so concurrent workers never load half a library. It links the OpenMP runtime torch has already
loaded (libgomp.so.1), so the kernel's threads are torch's.

`load()` returns the library, or None when it cannot be had (no compiler, a failed build,
ATTNPIPE_CPU_KERNEL=0, not Linux on x86-64 or arm64); the CPU path then uses torch ops for
the same results (recipes/attention.py, capture.LayerInputs). The reasons are logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attn.c")
# No -ffast-math: linked into a shared library it switches the whole process to flushing
# subnormals to zero (gcc's crtfastmath), which would change torch's numbers too.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
ENV = "ATTNPIPE_CPU_KERNEL"  # "0": never use the kernel
NSTATS = 9  # the columns of kernels/reference.py STATS

_loaded: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where builds go: $ATTNPIPE_CACHE/kernels, as the corpus, model and remote caches."""
    return Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe") / "kernels"


def _cpu_features() -> str:
    """The CPU's feature flags (-march=native compiles for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), os.path.realpath(compiler).encode(),
                 _cpu_features().encode(), platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"cpu_attn-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(run.stderr or run.stdout).strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The compiled kernel (a ctypes function), built on first use; None when unavailable."""
    if "lib" in _loaded:
        return _loaded["lib"]
    _loaded["lib"] = None
    if not enabled():
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        log.info("CPU attention kernel: not built on %s %s; torch ops instead", platform.system(), platform.machine())
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("CPU attention kernel: no C compiler (set CC); the CPU path uses torch ops instead")
        return None
    try:
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        fn = ctypes.CDLL(str(path)).attnpipe_attention_rows
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU attention kernel unavailable (%s); the CPU path uses torch ops instead", exc)
        return None
    p, i64, strides = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [p, strides, p, strides, p, strides, i64, i64, i64, i64, i64, i64, p, ctypes.c_int, i64,
                   ctypes.c_float, p, i64, p, strides, p, p, p, i64, p, p, i64, p, p]
    fn.restype = ctypes.c_int
    _loaded["lib"] = fn
    return fn


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _strides(t: torch.Tensor | None):
    """A ctypes array (kept alive by the call that takes it as an argument), or None."""
    return None if t is None else (ctypes.c_int64 * t.dim())(*t.stride())


def attention_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, lengths: torch.Tensor, *,
                   causal: bool, offset: int, scaling: float, flags: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, stats: bool = False, mean: bool = False,
                   probs: bool = False, topk_head: int = 0, topk_mean: int = 0) -> dict[str, torch.Tensor]:
    """One call of the kernel. query (batch, head, rows, dim) holds positions offset.. of each
    window, key and value (batch, kv_head, keys, dim), all float32 on the CPU, any strides;
    lengths (batch,) each window's real tokens (right padding). `out` (batch, rows, head, dim),
    contiguous in dim, receives P V (value needed). Returns the asked-for tensors: "stats"
    (batch, head, rows, 9) in reference.STATS order (key flags (batch, keys) uint8 needed:
    1 special, 2 sep, 4 punct), "mean" (batch, rows, keys) the mean over heads of P, "probs"
    (batch, head, rows, keys), zero on masked keys; with topk_head / topk_mean = k, "topk_head"
    (batch, head, rows, k) and "topk_mean" (batch, 1, rows, k): (weights float32, key positions
    int32) of each row's k strongest keys, every head's and on the head mean ("mean" comes too),
    descending, ties to the smaller position, weight and position -1 in slots past the row's keys
    and on padded queries (kernels.reference.row_topk)."""
    fn = load()
    if fn is None:
        raise RuntimeError("the CPU attention kernel is not available")
    batch, heads, rows, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    tensors = [t for t in (query, key, value, out) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("attention_rows takes float32 CPU tensors")
    if heads % kv_heads or (out is not None and (value is None or out.stride(-1) != 1)):
        raise ValueError("attention_rows: heads must be a multiple of kv heads; out needs value and unit dim stride")
    if stats and flags is None:
        raise ValueError("attention_rows: stats need the key flags")
    # the C side reads and writes through raw pointers: every shape it relies on, checked here
    shapes = [(key.shape[0], batch), (tuple(lengths.shape), (batch,))]
    if value is not None:
        shapes.append((tuple(value.shape[:3]), (batch, kv_heads, keys)))
    if out is not None:
        shapes.append((tuple(out.shape), (batch, rows, heads, dim)))
    if flags is not None:
        shapes.append((flags.dim() == 2 and flags.shape[0] == batch and flags.shape[1] >= keys, True))
    if value is not None and value.shape[3] != dim or any(got != want for got, want in shapes):
        raise ValueError(f"attention_rows: inconsistent shapes for query {tuple(query.shape)}, key {tuple(key.shape)}")
    result = {}
    if stats:
        result["stats"] = torch.empty((batch, heads, rows, NSTATS), dtype=torch.float32)
    if mean or topk_mean:
        result["mean"] = torch.empty((batch, rows, keys), dtype=torch.float32)
    tops = {}
    for name, count, width in (("topk_head", topk_head, heads), ("topk_mean", topk_mean, 1)):
        if count:
            tops[name] = (torch.empty((batch, width, rows, count), dtype=torch.float32),
                          torch.empty((batch, width, rows, count), dtype=torch.int32))
    empty = (None, None)
    if probs:
        result["probs"] = torch.empty((batch, heads, rows, keys), dtype=torch.float32)
    lengths = lengths.to(torch.int64).contiguous()
    if flags is not None and (flags.dtype != torch.uint8 or flags.stride(-1) != 1):
        flags = flags.to(torch.uint8).contiguous()
    failed = fn(_ptr(query), _strides(query), _ptr(key), _strides(key), _ptr(value), _strides(value),
                batch, heads, kv_heads, rows, keys, dim, _ptr(lengths), int(causal), offset, scaling,
                _ptr(flags), 0 if flags is None else flags.stride(0), _ptr(out), _strides(out), _ptr(result.get("stats")),
                _ptr(result.get("mean")), _ptr(result.get("probs")),
                topk_head, *map(_ptr, tops.get("topk_head", empty)), topk_mean, *map(_ptr, tops.get("topk_mean", empty)))
    if failed:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
    return {**result, **tops}
