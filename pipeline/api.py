"""The Python API, for notebooks and scripts: `attend()` on a few texts, `run()` for a batch job.

Both go through the same engine as `attnpipe run` (the same capture, recipes, writer and commit),
so what a notebook shows is what a corpus run stores:

    import attnpipe
    att = attnpipe.attend("The animal didn't cross the street because it was too tired.")
    att                                   # in Jupyter: the interactive head view, inline
    att.sql("SELECT * FROM edges_tokens WHERE layer = 5 AND query_token = 'it' ORDER BY weight DESC")
    ds = attnpipe.run("jobs/demo.toml")   # the batch job; returns the dataset it wrote
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from .errors import JobError, ModelError
from .job import JobSpec, build_job, load_job
from .read.notebook import Attention

# Recipes of `attend()` when none are given: the batch default set, plus dense maps of every head
# (a few sentences are small), so that the inline head view and plots show whole rows.
NOTEBOOK_RECIPES = [{"name": "head_stats"}, {"name": "topk", "k": 8, "per_head": False},
                    {"name": "rollout", "k": 8}, {"name": "dense", "max_tokens": 512, "per_head": True}]
_MODELS: "OrderedDict[tuple, Any]" = OrderedDict()  # loaded models by (name, device, dtype, backend)
_KEEP_MODELS = 2  # a notebook alternates between one or two models; more would hold memory


def attend(texts: str | Iterable[str], model: Any = "all-MiniLM-L6-v2", recipes: list | None = None, *,
           tokenizer: Any = None, ids: Iterable[str] | None = None, device: str = "auto",
           dtype: str = "float32", max_length: int | None = None, stride: int = 32,
           attention: str = "auto", weight_dtype: str = "float32") -> Attention:
    """Capture the attention of `texts` (one string or a list) and return it as a dataset.

    model: a model name or folder (as `[model] name` in a job: the embedded default, a local
    save_pretrained folder, a hub name) or a transformers model object, then with its `tokenizer`.
    recipes: as `[[recipes]]` in a job, a list of dicts or names ("topk", {"name": "topk", "k": 4});
    default: head_stats, topk k=8 on the head mean, rollout k=8 and dense maps of every head.
    ids: one doc_id per text (default "0", "1", ...). The result has the read API of
    `open_dataset` (`sql`, `to_pandas`, `tokens`, `heads`, `plot`) and renders inline in Jupyter;
    its data lives in a private temporary folder, removed by `close()` or when it is collected.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    if not texts or len(ids) != len(texts):
        raise JobError(f"attend(): give one text or a list of texts, and as many ids as texts "
                       f"(got {len(texts)} texts, {len(ids)} ids)")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise JobError(f"attend(): texts[{bad}] is a {type(texts[bad]).__name__}, not a string")
    folder = Path(tempfile.mkdtemp(prefix="attnpipe-attend-"))
    try:
        corpus = folder / "texts.jsonl"
        corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)),
                          encoding="utf-8")
        name = model if isinstance(model, str) else f"(object) {type(model).__name__}"
        job = build_job({
            "name": "attend", "corpus": {"path": str(corpus), "id_column": "id"},
            "model": {"name": name, "dtype": dtype, "max_length": max_length, "stride": stride},
            "run": {"output": str(folder / "data"), "device": device, "attention": attention,
                    "weight_dtype": weight_dtype, "progress": False},
            "recipes": [{"name": r} if isinstance(r, str) else r for r in (recipes or NOTEBOOK_RECIPES)],
        }, source="attend()", base_dir=Path.cwd())
        with _model_for(job, model, tokenizer) as lm:
            from .executor.local import run_job

            run_job(job, quiet=True, lm=lm)
        return Attention(folder / "data", cleanup=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run(job: str | Path | dict | JobSpec, *, quiet: bool = False, new_run: bool = False,
        **overrides: Any):
    """Run a batch job (a TOML file, a dict as a parsed job file, or a JobSpec) like `attnpipe
    run`; `overrides` are dotted job keys with underscores for dots, e.g. corpus__limit=50 or
    run__output="out/x". Returns the dataset it wrote (`open_dataset` of its output)."""
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    if isinstance(job, JobSpec):
        spec = build_job(job.model_dump(exclude={"base_dir"}), base_dir=job.base_dir, overrides=dotted)
    elif isinstance(job, dict):
        spec = build_job({"name": "job", **job}, source="run()", base_dir=Path.cwd(), overrides=dotted)
    else:
        spec = load_job(job, overrides=dotted)
    from .executor import run as run_executor
    from .read import open_dataset

    summary = run_executor(spec, quiet=quiet, new_run=new_run)
    ds = open_dataset(summary.output)
    ds.summary = summary
    return ds


class _model_for:
    """The LoadedModel for a job: a cached one for a name; for a model object, one built around
    it, whose settings (attention implementation, training mode, cache) are put back afterwards."""

    def __init__(self, job: JobSpec, model: Any, tokenizer: Any):
        self.job, self.model, self.tokenizer = job, model, tokenizer
        self.saved: tuple | None = None

    def __enter__(self):
        if isinstance(self.model, str):
            return _cached(self.job)
        from .model import LoadedModel, pick_device

        if self.tokenizer is None:
            raise ModelError(f"attend(): a model object needs its tokenizer too (tokenizer=...); got "
                             f"{type(self.model).__name__} alone")
        if not hasattr(self.model, "config") or not hasattr(self.model, "set_attn_implementation"):
            raise ModelError(f"attend(): {type(self.model).__name__} is not a transformers model; give a "
                             "PreTrainedModel and its tokenizer, or a model name or folder")
        config = self.model.config
        self.saved = (config._attn_implementation, self.model.training, getattr(config, "use_cache", None),
                      next(self.model.parameters()).device)
        device = self.saved[3] if self.job.run.device == "auto" else pick_device(self.job.run.device)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return LoadedModel(self.model, self.tokenizer, self.job.model.name, device, dtype,
                           {"source": "(object)"}, self.job.run.attention)

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            return
        implementation, training, use_cache, device = self.saved
        self.model.set_attn_implementation(implementation)
        self.model.train(training).to(device)
        if use_cache is not None:
            self.model.config.use_cache = use_cache


def _cached(job: JobSpec):
    from .runtime import load_job_model

    m = job.model
    key = (m.name, m.revision, m.dtype, job.run.device, job.run.attention, str(Path(job.base_dir).resolve()))
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    with _no_load_bars():
        lm = load_job_model(job)
    _MODELS[key] = lm
    while len(_MODELS) > _KEEP_MODELS:
        _MODELS.popitem(last=False)
    return lm


@contextmanager
def _no_load_bars():
    """transformers' weight-loading bar off while attend() loads a model, then as it was: the
    notebook's own use of transformers keeps its settings."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
