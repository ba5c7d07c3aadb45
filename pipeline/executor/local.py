"""Run a job in this process: shards one after another, each committed on its own.

The executor chooses the output version, takes the output's lock, cleans up what killed runs
left, refuses a corpus or model that changed under committed shards, then runs the step for
every shard that has no commit record. It never touches rows.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import faults
from ..corpus import Corpus
from ..errors import OutputError
from ..job import JobSpec
from ..runtime import Runtime, open_job_corpus
from ..store.dataset import choose_output, read_info, recover, write_info, write_manifest
from ..store.lock import OutputLock
from ..store.plan import ShardSpec, make_plan, shard_specs

log = logging.getLogger("attnpipe")


@dataclass
class RunSummary:
    output: Path
    shards_run: list[int]
    shards_skipped: list[int]
    totals: dict
    repeated_texts: int = 0


def check_inputs(out: Path, records: dict[int, dict], corpus: Corpus) -> None:
    """Refuse to add shards beside committed ones whose documents have changed since (a corpus
    that only grew by appending keeps every committed shard's documents)."""
    for shard, record in sorted(records.items()):
        start, stop = record.get("corpus_rows", (0, 0))
        now = corpus.shard(shard, start, stop).fingerprint if stop <= len(corpus) else None
        if record.get("inputs") != now:
            raise OutputError(f"the corpus changed since shard {shard} of {out} was committed (its documents or "
                              "their texts differ); rerun with --new-run to write a new version beside the old "
                              "data, or choose another --output")


def check_weights(out: Path, records: dict[int, dict], rt: Runtime) -> None:
    for shard, record in sorted(records.items()):
        if record.get("weights") != rt.weights_id:
            raise OutputError(f"the model's weights changed since shard {shard} of {out} was committed "
                              f"({str(record.get('weights'))[:12]}... then, {str(rt.weights_id)[:12]}... now); rerun "
                              "with --new-run to write a new version beside the old data, or choose another --output")


class _Progress:
    """A token bar with an ETA: the total is estimated from the characters still to read."""

    def __init__(self, job: JobSpec, corpus: Corpus, todo: list[ShardSpec], device: str, quiet: bool):
        shards = [corpus.shard(s.index, s.start, s.stop) for s in todo]
        self.docs = sum(len(s.rows) for s in shards)
        self.chars_total = int(sum(int(s.chars.sum()) for s in shards))
        self.chars = self.tokens = self.done = 0
        self.bar = tqdm(total=max(self.chars_total // 4, 1), unit="tok", unit_scale=True, dynamic_ncols=True,
                        disable=quiet or not job.run.progress, desc=f"{job.name} ({device})")

    def __call__(self, docs: int, tokens: int, chars: int) -> None:
        self.done += docs
        self.tokens += tokens
        self.chars += chars
        if self.chars:
            ratio = self.tokens / self.chars
            self.bar.total = max(int(self.tokens + (self.chars_total - self.chars) * ratio), self.tokens, 1)
        self.bar.set_postfix_str(f"{self.done}/{self.docs} docs", refresh=False)
        self.bar.update(tokens)

    def close(self) -> None:
        self.bar.close()


def run_job(job: JobSpec, quiet: bool = False, lm=None, new_run: bool = False) -> RunSummary:
    root = job.output_dir()
    parts, fingerprint = job.fingerprint_parts(), job.fingerprint()
    out = choose_output(root, fingerprint, parts, new_run)
    corpus = open_job_corpus(job)  # a bad corpus fails here, before anything is created
    if corpus.repeated_texts and not job.corpus.id_column:
        log.info("%d documents repeat the text of an earlier one; their ids end in -2, -3, ... "
                 "(documents.occurrence > 1)", corpus.repeated_texts)
    created = [p for p in [out, *out.parents] if not p.exists()]
    ran, committed = [], {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        with OutputLock(out, job.run.lock_lease) as lock:
            committed = recover(out)
            check_inputs(out, committed, corpus)
            plan = make_plan(len(corpus), job.run.num_shards, (read_info(out) or {}).get("plan"), committed)
            todo = [s for s in shard_specs(plan) if s.index not in committed]
            if todo:
                from ..shard import run_shard  # torch and the model load only when there is work

                rt = Runtime.build(job, corpus, lm)
                faults.point("load")
                check_weights(out, committed, rt)
                write_info(out, job.model_dump(), fingerprint, parts, plan)
                progress = _Progress(job, corpus, todo, str(rt.model.device), quiet)
                try:
                    for shard in todo:
                        lock.check()
                        run_shard(job, shard, rt, out, progress)
                        ran.append(shard.index)
                        write_manifest(out)
                finally:
                    progress.close()
                faults.point("last")
            manifest = write_manifest(out)
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc} (errno {exc.errno}); "
                          "shards committed before this are kept, and a rerun continues from them") from None
    finally:
        if created and not committed and not ran:
            shutil.rmtree(created[-1], ignore_errors=True)  # this run made the folder and committed nothing
    return RunSummary(out, ran, sorted(committed), manifest["totals"], corpus.repeated_texts)
