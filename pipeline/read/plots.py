"""Figures, drawn with matplotlib (the optional extra `attnpipe[plot]`, imported only here and
only when a figure is drawn): attention heatmaps, head grids and rollout views, as PNG or SVG.

Each `*_figure` returns a matplotlib Figure; `save(fig, path)` writes it by the path's suffix
and `render(fig, fmt)` returns the bytes (the report inlines them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import ReadError
from .heads import SHORT
from .matrices import Matrix

FORMATS = ("png", "svg")
CMAP = "viridis"
MISSING = "#eeeeee"  # cells not stored (sparse edges)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReadError("plots need matplotlib, which is not installed: pip install 'attnpipe[plot]'") from None
    matplotlib.use("Agg")  # files only: never a window, works without a display
    matplotlib.rcParams["svg.hashsalt"] = "attnpipe"  # the same SVG for the same data
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text (searchable, small); matplotlib escapes it
    import matplotlib.pyplot as plt

    return plt


def image_format(path: str | Path) -> str:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ReadError(f"cannot tell the image format of {path}: name it .png or .svg")
    return fmt


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    fmt = image_format(path)
    if not path.parent.is_dir():
        raise ReadError(f"cannot write {path}: folder {path.parent} does not exist")
    path.write_bytes(render(fig, fmt))
    return path


def render(fig, fmt: str = "png", dpi: int = 110) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return buf.getvalue()


def _cmap(plt):
    return plt.get_cmap(CMAP).with_extremes(bad=MISSING)


def matrix_figure(m: Matrix, max_size: float = 11.0):
    """A heatmap of `m` with its labels on both axes; cells not stored are light grey."""
    plt = _pyplot()
    rows, cols = m.weights.shape
    cell = min(0.34, max(0.12, max_size / max(rows, cols, 1)))  # inches per cell
    width, height = max(4.0, cols * cell + 2.2), max(2.5, rows * cell + 1.8)
    fig, ax = plt.subplots(figsize=(width, height))
    finite = m.weights[np.isfinite(m.weights)]
    image = ax.imshow(np.ma.masked_invalid(m.weights), cmap=_cmap(plt), vmin=0,
                      vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1, aspect="auto")
    size = max(4.0, min(9.0, cell * 72 * 0.6))  # a label fits in its row
    ax.set_xticks(range(cols), m.col_labels, rotation=90, fontsize=size)
    ax.set_yticks(range(rows), m.row_labels, fontsize=size)
    ax.set_xlabel(m.col_name)
    ax.set_ylabel(m.row_name)
    ax.set_title(f"{m.title}\n{m.source}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="attention")
    return fig


def grid_figure(atlas, stat: str):
    """Layers x heads grid of one atlas statistic (the corpus mean), each cell annotated with
    its value and the head's label."""
    plt = _pyplot()
    if stat not in atlas.columns:
        from .heads import STATS

        raise ReadError(f"unknown statistic {stat!r}; statistics: {', '.join(STATS)}")
    kinds = "stack" in atlas.columns  # one atlas per attention kind: a block of rows each
    row_of = (lambda r: (r.stack, r.attention, r.layer)) if kinds else (lambda r: r.layer)  # noqa: E731
    layers, heads = sorted({row_of(r) for r in atlas.itertuples()}), sorted(set(atlas["head"]))
    grid = np.full((len(layers), len(heads)), np.nan)
    names = np.full(grid.shape, "", dtype=object)
    for row in atlas.itertuples():
        i, j = layers.index(row_of(row)), heads.index(row.head)
        grid[i, j] = getattr(row, stat)
        names[i, j] = SHORT.get(row.label, row.label)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.62 * len(heads) + 2), max(2.5, 0.5 * len(layers) + 1.4)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=_cmap(plt), aspect="auto")
    ax.set_xticks(range(len(heads)), ["mean" if h == -1 else str(h) for h in heads], fontsize=8)
    ax.set_yticks(range(len(layers)), [f"{v[0]}-{v[1]} {v[2]}" if kinds else str(v) for v in layers], fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{stat}: mean over windows, with each head's label", fontsize=9)
    top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    low = np.nanmin(grid) if np.isfinite(grid).any() else 0.0
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            dark = (value - low) / ((top - low) or 1) < 0.6
            ax.text(j, i, f"{value:.2f}\n{names[i, j]}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label=stat)
    return fig
