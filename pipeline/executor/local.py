"""Run a job in this process: shards one after another, skipping finished ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..corpus import open_corpus, shard_of
from ..errors import JobError
from ..job import JobSpec
from ..manifest import Manifest
from ..model import load_model
from ..recipes import RECIPES
from ..schema import load_schemas
from ..shard import run_shard, window_length


@dataclass
class RunSummary:
    output: Path
    shards_run: list[int]
    shards_skipped: list[int]
    totals: dict


def provenance_of(job: JobSpec, lm) -> dict:
    return {**lm.provenance, "job": job.name, "job_fingerprint": job.fingerprint(),
            "window_length": window_length(job, lm), "stride": job.model.stride,
            "recipes": {r["name"]: RECIPES[r["name"]].version for r in job.recipes},
            "schemas": {name: s.version for name, s in load_schemas().items()}}


def check_windowing(job: JobSpec, lm) -> None:
    room = window_length(job, lm) - lm.tokenizer.num_special_tokens_to_add()
    if job.model.stride >= room:
        raise JobError(f"model.stride ({job.model.stride}) must be smaller than the window's room "
                       f"for text ({room} tokens = max_length minus special tokens)")


def run_job(job: JobSpec, quiet: bool = False, lm=None) -> RunSummary:
    out = job.output_dir()
    manifest = Manifest.open(out, job.model_dump(), job.fingerprint())
    corpus = open_corpus(job.corpus, Path(job.base_dir))
    n = job.run.num_shards
    todo = [s for s in range(n) if not manifest.complete(s)]
    skipped = [s for s in range(n) if manifest.complete(s)]
    if todo:
        lm = lm or load_model(job.model.name, base_dir=Path(job.base_dir), revision=job.model.revision,
                              dtype=job.model.dtype, device=job.run.device,
                              trust_remote_code=job.model.trust_remote_code,
                              allow_pickle=job.model.allow_pickle)
        check_windowing(job, lm)
        provenance = provenance_of(job, lm)
        manifest.data["provenance"] = provenance
        manifest.data["num_shards"] = n
        manifest.save()
        done_docs = sum(manifest.data["shards"][str(s)]["documents"] for s in skipped)
        bar = tqdm(total=len(corpus), initial=done_docs, unit="doc", disable=quiet or not job.run.progress,
                   desc=f"{job.name} ({lm.device})", dynamic_ncols=True)
        tokens = [0]

        def progress(docs: int, toks: int) -> None:
            tokens[0] += toks
            rate = tokens[0] / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            bar.update(docs)

        try:
            for s in todo:
                manifest.record(s, run_shard(job, s, shard_of(corpus, n, s), lm, out, provenance, progress))
        finally:
            bar.close()
    manifest.data["status"] = "complete"
    manifest.save()
    return RunSummary(out, todo, skipped, manifest.totals())
