"""`attnpipe export distill OUT`: a run's attention rows as teacher targets for a training loop,
Parquet that `datasets.load_dataset("parquet", data_files=".../targets.parquet")` reads.

Every row is one query row of one head: doc_id, window_index, layer, head, query_pos, num_keys
(the row's keys: the window's tokens, or query_pos + 1 for causal models), and by format:

- dense:   probs, the row's probabilities on keys 0 .. num_keys-1 (exact).
- sparse:  key_pos and probs of the k largest probabilities (descending; ties: lower key first),
           leftover = 1 - their sum (the mass of the other num_keys - k keys), and
           remainder_entropy_max = log(num_keys - k), the largest entropy those keys' share can
           have (nats, of the renormalized remainder). A loss that puts `leftover` evenly on the
           other keys, as `truncation_kl` measures, keeps each row a distribution; top-k alone
           would be a biased target (Anshumann et al., ACL 2025).
           The row's log-sum-exp of the pre-softmax scores is NOT stored: a run stores
           probabilities, and the scores' normalizer cannot be recovered from them (any shift of
           every score gives the same probabilities). Targets here are defined on probabilities.
- sampled: `samples` keys drawn with replacement from the row (seeded, numpy's PCG64), stored
           once each with weight = count / samples: an unbiased estimate of the row
           (E[weight_k] = p_k), so sum_k weight_k * (log p_k - log q_k) is an unbiased estimate of
           KL(p || q). probs holds p_k of the same keys.

Truncation error per head (truncation.parquet, summary.json):
- sparse: truncation_kl of a row = KL(p || r), where r keeps the top-k probabilities and spreads
  `leftover` evenly over the other keys; reported as its mean and max per (layer, head).
- sampled: sampling_tv of a row = total variation sum_k |weight_k - p_k| / 2, mean and max per head.

Only rows of dense maps are exported (top-k edges lack the rest of each row, so the truncation
error could not be measured); when the run stored only the head mean, head is -1.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..errors import ReadError
from .attention_runs import Key, Run, open_run
from .distill import kl_rows
from .results import STUDIES, _remove, _replace

FORMATS = ("dense", "sparse", "sampled")
KEYS = [("doc_id", pa.string()), ("window_index", pa.int32()), ("layer", pa.int16()), ("head", pa.int16()),
        ("query_pos", pa.int32()), ("num_keys", pa.int32())]
COLUMNS = {
    "dense": [("probs", pa.list_(pa.float32()))],
    "sparse": [("key_pos", pa.list_(pa.int32())), ("probs", pa.list_(pa.float32())), ("leftover", pa.float32()),
               ("remainder_entropy_max", pa.float32()), ("truncation_kl", pa.float32())],
    "sampled": [("key_pos", pa.list_(pa.int32())), ("weight", pa.list_(pa.float32())),
                ("probs", pa.list_(pa.float32())), ("samples", pa.int32()), ("sampling_tv", pa.float32())],
}


@dataclass(frozen=True)
class ExportOptions:
    format: str = "dense"
    k: int = 8  # sparse: keys kept per row; sampled: draws per row
    seed: int = 0
    chunk: int = 64  # windows read at once


def schema(fmt: str) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in KEYS + COLUMNS[fmt]])


def default_out(output: str | Path, options: ExportOptions) -> Path:
    """OUT/_studies/distill-export-<format>[-k<k>]."""
    if "://" in str(output):
        raise ReadError(f"{output} is a URL: give a local folder for the export with --out DIR")
    tail = "" if options.format == "dense" else f"-k{options.k}"
    return Path(str(output).removeprefix("file://")) / STUDIES / f"distill-export-{options.format}{tail}"


def window_rows(a: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A window's (layer, head, query_pos, key_pos) array as rows: (rows, keys) probabilities with
    padding 0, the valid-key mask, and each row's layer, head, query_pos as one (rows, 3) array."""
    layers, heads, n, _ = a.shape
    valid = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    index = np.stack(np.meshgrid(np.arange(layers), np.arange(heads), np.arange(n), indexing="ij"), -1)
    return a.reshape(-1, n), np.broadcast_to(valid, a.shape).reshape(-1, n), index.reshape(-1, 3), valid.sum(1)


def topk_target(p: np.ndarray, valid: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Rows (rows, keys) -> the k largest valid keys (descending, ties to the lower key), leftover,
    remainder_entropy_max and truncation_kl (see the module's definitions)."""
    n = valid.sum(1)
    order = np.argsort(-np.where(valid, p, -1.0), axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(valid, order, 1)  # a row with fewer than k keys keeps them all
    top = np.where(kept, np.take_along_axis(p, order, 1), 0.0)
    leftover = np.clip(1.0 - top.sum(1), 0.0, None)
    rest = n - kept.sum(1)
    r = np.where(valid, (leftover / np.maximum(rest, 1))[:, None], 0.0)
    np.put_along_axis(r, order, np.where(kept, top, np.take_along_axis(r, order, 1)), 1)
    return {"order": order, "kept": kept, "top": top, "leftover": leftover,
            "remainder_entropy_max": np.log(np.maximum(rest, 1)), "truncation_kl": kl_rows(p, r)}


def sampled_target(p: np.ndarray, valid: np.ndarray, samples: int, rng: np.random.Generator) -> dict:
    """`samples` draws per row from p: counts / samples as weights, and the total variation."""
    q = np.where(valid, np.clip(p, 0.0, None), 0.0)
    q = q / q.sum(1, keepdims=True)
    weight = rng.multinomial(samples, q) / samples
    return {"weight": weight, "sampling_tv": np.abs(weight - q).sum(1) / 2}


def lists(values: np.ndarray, keep: np.ndarray, dtype) -> pa.Array:
    """Row-wise lists of values[i][keep[i]] as an Arrow list array."""
    lengths = keep.sum(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep].astype(dtype)))


def batch(key: Key, a: np.ndarray, run: Run, options: ExportOptions, rng) -> pa.RecordBatch:
    """One window's rows in the export's format."""
    p, valid, index, _ = window_rows(a, run.causal)
    n = valid.sum(1)
    head = index[:, 1] if run.maps.per_head else np.full(len(index), -1)
    cols = {"doc_id": pa.array([key[0]] * len(p)), "window_index": pa.array(np.full(len(p), key[1], np.int32)),
            "layer": pa.array(index[:, 0].astype(np.int16)), "head": pa.array(head.astype(np.int16)),
            "query_pos": pa.array(index[:, 2].astype(np.int32)), "num_keys": pa.array(n.astype(np.int32))}
    if options.format == "dense":
        cols["probs"] = lists(p, valid, np.float32)
    elif options.format == "sparse":
        t = topk_target(p, valid, options.k)
        cols.update(key_pos=lists(t["order"], t["kept"], np.int32), probs=lists(t["top"], t["kept"], np.float32),
                    leftover=pa.array(t["leftover"].astype(np.float32)),
                    remainder_entropy_max=pa.array(t["remainder_entropy_max"].astype(np.float32)),
                    truncation_kl=pa.array(t["truncation_kl"].astype(np.float32)))
    else:
        s = sampled_target(p, valid, options.k, rng)
        keys = np.broadcast_to(np.arange(p.shape[1]), p.shape)
        drawn = s["weight"] > 0
        cols.update(key_pos=lists(keys, drawn, np.int32), weight=lists(s["weight"], drawn, np.float32),
                    probs=lists(p, drawn, np.float32), samples=pa.array(np.full(len(p), options.k, np.int32)),
                    sampling_tv=pa.array(s["sampling_tv"].astype(np.float32)))
    return pa.RecordBatch.from_pydict(cols, schema=schema(options.format))


def export(output: str | Path, out: Path, options: ExportOptions = ExportOptions()) -> dict:
    """Write OUTPUT's teacher targets into `out`; returns the summary (also summary.json)."""
    if options.format not in FORMATS:
        raise ReadError(f"--format {options.format!r}: use one of {', '.join(FORMATS)}")
    run = open_run(output, "OUTPUT")
    if run.maps is None:
        raise ReadError(f"{output} has no token-level dense maps (table maps); the export needs whole rows: add "
                        "[[recipes]] name = \"dense\" to its job and run it again")
    keys = run.windows(run.maps)
    rng = np.random.default_rng(options.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "truncation.parquet", "targets.parquet"):  # nothing of an earlier export mixes in
        _remove(out / name)
    target = out / "targets.parquet"
    tmp = target.with_name(f".targets.{secrets.token_hex(4)}.tmp")
    errors, rows = [], 0
    try:
        with pq.ParquetWriter(tmp, schema(options.format)) as writer:
            for i in range(0, len(keys), options.chunk):
                arrays = run.arrays(run.maps, keys[i:i + options.chunk])
                for key in keys[i:i + options.chunk]:
                    b = batch(key, arrays[key], run, options, rng)
                    writer.write_batch(b)
                    rows += b.num_rows
                    errors.append(_error_columns(b, options.format))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return _finish(run, out, options, keys, rows, errors)


def _error_columns(b: pa.RecordBatch, fmt: str) -> pd.DataFrame | None:
    """Per (layer, head) of one batch: rows, sum and max of its truncation_kl (or sampling_tv),
    so that memory does not grow with the rows exported."""
    column = {"sparse": "truncation_kl", "sampled": "sampling_tv"}.get(fmt)
    if column is None:
        return None
    frame = pd.DataFrame({"layer": b["layer"].to_numpy(), "head": b["head"].to_numpy(),
                          "error": b[column].to_numpy().astype(np.float64)})
    return frame.groupby(["layer", "head"])["error"].agg(rows="size", total="sum", max="max")


def truncation_table(errors: list[pd.DataFrame | None], fmt: str) -> pd.DataFrame | None:
    """Per (layer, head): rows, mean and max of the rows' truncation_kl (or sampling_tv)."""
    frames = [e for e in errors if e is not None]
    if not frames:
        return None
    name = "truncation_kl" if fmt == "sparse" else "sampling_tv"
    g = pd.concat(frames).groupby(level=["layer", "head"])
    out = pd.DataFrame({"rows": g["rows"].sum(), f"{name}_mean": g["total"].sum() / g["rows"].sum(),
                        f"{name}_max": g["max"].max()})
    return out.reset_index()


def _finish(run: Run, out: Path, options: ExportOptions, keys: list[Key], rows: int, errors: list) -> dict:
    table = truncation_table(errors, options.format)
    files = ["targets.parquet"]
    if table is not None:
        _replace(out / "truncation.parquet", lambda p: table.to_parquet(p, index=False))
        files.append("truncation.parquet")
    summary = {"export": "distill", "dataset": run.path, "model": run.provenance.get("model"),
               "weights_sha256": run.provenance.get("weights_sha256"), "recipe": run.maps.label,
               "format": options.format, "k": options.k if options.format != "dense" else None,
               "seed": options.seed if options.format == "sampled" else None,
               "windows": len(keys), "rows": rows, "files": files + ["summary.json"],
               "load": f'datasets.load_dataset("parquet", data_files="{out / "targets.parquet"}", split="train")',
               "attnpipe_version": __version__}
    if table is not None:
        name = table.columns[-2]  # <measure>_mean
        worst = table.loc[table[name].idxmax()]
        summary["error"] = {"measure": name.removesuffix("_mean"), "mean": float(table[name].mean()),
                            "max_head_mean": float(worst[name]),
                            "worst_head": {"layer": int(worst["layer"]), "head": int(worst["head"])}}
    _replace(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8"))
    return summary
