"""What every executor does around its shards, so that executors only schedule.

`JobRun` chooses the output version, opens the corpus, takes the output's lock, cleans up what
killed attempts left, refuses a corpus or model that changed under committed shards, plans the
shards (appended corpus rows become new shards), and on leaving writes the manifest, releases
the lock, and removes a folder this run created but committed nothing to. Executors call
`begin` before the first shard, `done` / `failed` per shard. The driver never holds rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..corpus import Corpus
from ..errors import OutputError
from ..job import JobSpec
from ..runtime import open_job_corpus
from ..store import paths
from ..store.commit import write_json
from ..store.location import Location, as_location
from ..store.dataset import choose_output, read_info, recover, version_location, versions, write_info, write_manifest
from ..store.lock import OutputLock
from ..store.plan import ShardSpec, make_plan, shard_specs
from ..words import plural

log = logging.getLogger("attnpipe")


@dataclass
class RunSummary:
    output: Path | str  # a Path for a local output, its URL otherwise
    shards_run: list[int]
    shards_skipped: list[int]
    totals: dict
    repeated_texts: int = 0
    failed: dict[int, str] | None = None
    provenance: dict | None = None  # of the newest commit: model, window_length, window_from, ...


def check_inputs(out: Location | Path, records: dict[int, dict], corpus: Corpus) -> None:
    """Refuse to add shards beside committed ones whose documents have changed since (a corpus
    that only grew by appending keeps every committed shard's documents)."""
    for shard, record in sorted(records.items()):
        start, stop = record.get("corpus_rows", (0, 0))
        now = corpus.shard(shard, start, stop).fingerprint if stop <= len(corpus) else None
        if record.get("inputs") != now:
            raise OutputError(f"the corpus changed since shard {shard} of {out} was committed (its documents or "
                              "their texts differ); rerun with --new-run to write a new version beside the old "
                              "data, or choose another --output")


def check_weights(out: Location | Path, records: dict[int, dict], weights_id: str | None) -> None:
    if weights_id is None:  # a hub model without a pinned revision: known only once loaded
        return
    for shard, record in sorted(records.items()):
        if record.get("weights") != weights_id:
            raise OutputError(f"the model's weights changed since shard {shard} of {out} was committed "
                              f"({str(record.get('weights'))[:12]}... then, {weights_id[:12]}... now); rerun "
                              "with --new-run to write a new version beside the old data, or choose another --output")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def refuse_while_written(root: Location | Path | str, out: Location, lease: float) -> None:
    """Raise, naming the holder, when a live run holds the lock of a version of `root` other
    than `out` (the one this run takes, whose own lock says the same when it is taken)."""
    root = as_location(root)
    for v in versions(root):
        folder = version_location(root, v)
        if folder != out:
            OutputLock(folder, lease).refuse_if_held()


class JobRun:
    def __init__(self, job: JobSpec, new_run: bool = False):
        self.job, self.new_run = job, new_run
        self.ran: list[int] = []
        self.failures: dict[int, str] = {}
        self.committed: dict[int, dict] = {}
        self.manifest: dict = {}

    def __enter__(self) -> "JobRun":
        job = self.job
        self.fingerprint, self.parts = job.fingerprint(), job.fingerprint_parts()
        self.out = choose_output(job.output_dir(), self.fingerprint, self.parts, self.new_run)
        if self.new_run:  # a new version beside a run still writing an older one: refused as a rerun is
            refuse_while_written(job.output_dir(), self.out, job.run.lock_lease)
        self.corpus = open_job_corpus(job)  # a bad corpus fails here, before anything is created
        if self.corpus.repeated_texts and not job.corpus.id_column:
            log.info("%d documents repeat the text of an earlier one; their ids end in -2, -3, ... "
                     "(documents.occurrence > 1)", self.corpus.repeated_texts)
        self.created = self.out.parent_chain()
        self.lock = OutputLock(self.out, job.run.lock_lease)
        try:
            self.out.makedirs()
            self.lock.acquire()
        except OSError as exc:
            self._cleanup()
            raise self._os_error(exc) from None
        except BaseException:
            self._cleanup()
            raise
        try:
            self.committed = recover(self.out)
            self.plan = make_plan(len(self.corpus), job.run.num_shards, (read_info(self.out) or {}).get("plan"),
                                  self.committed, job.corpus.limit)
            check_inputs(self.out, self.committed, self.corpus)
            self.todo: list[ShardSpec] = [s for s in shard_specs(self.plan) if s.index not in self.committed]
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def begin(self, weights_id: str | None) -> None:
        """Before the first shard: the model's weights are those of the committed shards."""
        check_weights(self.out, self.committed, weights_id)
        write_info(self.out, self.job.model_dump(), self.fingerprint, self.parts, self.plan)

    def done(self, shard: int) -> None:
        self.ran.append(shard)
        self.out.rm(paths.failure_rel(shard))
        write_manifest(self.out)

    def failed(self, spec: ShardSpec, error: str, attempts: int, executor: str) -> None:
        self.failures[spec.index] = error
        write_json(self.out, paths.failure_rel(spec.index), {
            "shard": spec.index, "corpus_rows": [spec.start, spec.stop], "error": error,
            "attempts": attempts, "executor": executor, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.lock.held() and self.out.isdir(paths.COMMITS):
                for shard in list(self.committed) + self.ran:  # failures of shards that committed since
                    self.out.rm(paths.failure_rel(shard))
                self.manifest = write_manifest(self.out)
        except OSError:
            pass
        finally:
            self.lock.release()
            self._cleanup()
        if exc_type is not None and issubclass(exc_type, OSError):
            raise self._os_error(exc) from None
        if exc_type is None:
            self.lock.ensure()  # a renewal that failed after the last check: never exit 0 on it

    def _cleanup(self) -> None:
        if self.created and not self.committed and not self.ran:
            self.created[-1].rmtree()  # this run made the folder and committed nothing

    def _os_error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write to {self.out}: {exc.strerror or exc} (errno {exc.errno}); shards "
                           "committed before this are kept, and a rerun continues from them")

    def summary(self) -> RunSummary:
        output = Path(self.out.root) if self.out.local else self.out.url()
        return RunSummary(output, self.ran, sorted(self.committed), self.manifest.get("totals", {}),
                          self.corpus.repeated_texts, self.failures or None, self.manifest.get("provenance"))

    def raise_failures(self) -> None:
        """After the run: one error naming every shard that kept failing, and what to do."""
        if not self.failures:
            return
        shown = "; ".join(f"shard {s}: {e}" for s, e in sorted(self.failures.items())[:3])
        more = f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        raise OutputError(f"{len(self.failures)} of {plural(len(self.plan['shards']), 'shard')} failed after "
                          f"{self.job.run.retries + 1} attempts ({shown}{more}); the other shards are committed "
                          f"in {self.out}; fix the cause and rerun to retry the failed ones")


class Progress:
    """A token bar with an ETA. Its total is the dry run's token estimate for the pending shards
    (`plan_preview.estimate_tokens`), made once before the first shard. It is only ever raised
    (when the tokens done and the estimates of the shards not finished exceed it), so the bar
    never jumps back, and when every shard is over it becomes the tokens done: 100% is exact."""

    def __init__(self, job: JobSpec, corpus: Corpus, todo: list[ShardSpec], where: str, quiet: bool):
        disable = quiet or not job.run.progress
        self.estimates = {} if disable else shard_estimates(job, corpus, todo)
        self.pending = sum(self.estimates.values())  # estimated tokens of the shards not finished
        self.docs = sum(max(min(s.stop, len(corpus)) - s.start, 0) for s in todo)
        self.shards, self.shards_done, self.shards_failed = len(todo), 0, 0
        self.tokens = self.done = 0
        self.open_tokens = 0  # tokens of the shard in progress (local; a Dask shard reports once)
        self.bar = tqdm(total=max(self.pending, 1), unit="tok", unit_scale=True, dynamic_ncols=True,
                        disable=disable, desc=f"{job.name} ({where})")
        self._postfix(refresh=False)

    def __call__(self, docs: int, tokens: int, chars: int = 0) -> None:
        """Documents and tokens finished (a batch, or a whole shard under Dask)."""
        self.done += docs
        self.tokens += tokens
        self.open_tokens += tokens
        ahead = max(self.pending - self.open_tokens, 0)
        if self.tokens + ahead > self.bar.total:  # only upward
            self.bar.total = self.tokens + ahead
        self._postfix(refresh=False)
        self.bar.update(tokens)

    def shard_done(self, shard: int, failed: bool = False) -> None:
        self.shards_failed += failed
        self.shards_done += not failed
        self.pending -= self.estimates.get(shard, 0)
        self.open_tokens = 0
        self._postfix(refresh=True)

    def _postfix(self, refresh: bool) -> None:
        failed = f", {self.shards_failed} failed" if self.shards_failed else ""
        self.bar.set_postfix_str(f"{self.done}/{self.docs} docs, shards {self.shards_done}/{self.shards}{failed}",
                                 refresh=refresh)

    def close(self) -> None:
        if self.shards_done + self.shards_failed == self.shards:  # over: the true count, not the estimate
            self.bar.total = max(self.bar.n, 1)
            self.bar.refresh()
        self.bar.close()


def shard_estimates(job: JobSpec, corpus: Corpus, todo: list[ShardSpec]) -> dict[int, int]:
    """{shard: estimated tokens}, as `attnpipe run --dry-run` estimates them."""
    from ..plan_preview import estimate_tokens

    try:
        tokens = estimate_tokens(job, corpus, todo).per_shard(todo, len(corpus))
    except Exception as exc:  # noqa: BLE001 - a progress bar must never stop a run
        log.debug("no token estimate for the progress bar: %s", one_line(exc))
        tokens = [int(corpus.chars[s.start:min(s.stop, len(corpus))].sum()) // 4 for s in todo]
    return {s.index: n for s, n in zip(todo, tokens)}
