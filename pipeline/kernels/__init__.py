"""Attention statistics computed from a layer's q and k, without materialising P where possible.

Two implementations with the same four functions (row_lse, row_stats, row_topk, head_mean_map):
- `reference`: plain torch, float32, any device. The tests' reference.
- `triton`: fused Triton kernels (flash-attention-style recompute, P never written to memory),
  imported on first use so that this package loads without triton installed.
Use `available()` to decide between them.

And for the CPU path, `cpu`: one compiled C pass over each attention row (cpu_attn.c, built on
first use), which gives the layer's output along with the row statistics and head-mean map.
"""

from __future__ import annotations

import importlib.util
import os

from . import cpu, reference

__all__ = ["available", "cpu", "reference", "triton"]


def available() -> bool:
    """True when the Triton kernels can run: triton importable and CUDA present, or the
    interpreter requested (TRITON_INTERPRET=1, which runs them on CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    if name == "triton":  # lazy: importing triton is slow and optional
        from . import triton_attn

        return triton_attn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
