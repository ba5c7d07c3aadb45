"""The read side: open a dataset, query it, summarise its heads, plot it, report on it.

This package reads committed data only (files listed by the commit records) and never imports
model, capture or executor code, nor torch: reading a dataset needs none of them.

    dataset.py   open_dataset(OUT) -> AttnDataset: pyarrow, pandas and SQL over committed files
    query.py     read-only DuckDB views of every table, plus edges_tokens and rollout_tokens
    output.py    results as an aligned table, CSV, JSON or Parquet
    heads.py     the head atlas: per-head means and spreads, labels from documented thresholds
    matrices.py  one attention matrix (maps, or edges as a sparse view), rollout rows, word merging
    plots.py     matplotlib figures (imported only when a plot is asked for)
    report.py    one self-contained HTML report with an interactive head view
"""

from .dataset import AttnDataset, open_dataset

__all__ = ["AttnDataset", "open_dataset"]
