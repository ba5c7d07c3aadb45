"""Run a job in this process: shards one after another, each committed on its own."""

from __future__ import annotations

from .. import faults
from ..job import JobSpec
from ..runtime import Runtime
from .base import JobRun, Progress, RunSummary, check_inputs, check_weights  # noqa: F401 (re-exported)


def run_job(job: JobSpec, quiet: bool = False, lm=None, new_run: bool = False) -> RunSummary:
    with JobRun(job, new_run) as run:
        if run.todo:
            from ..shard import run_shard  # torch and the model load only when there is work

            rt = Runtime.build(job, run.corpus, lm)
            faults.point("load")
            run.begin(rt.weights_id)
            progress = Progress(job, run.corpus, run.todo, str(rt.model.device), quiet)

            def step(docs: int, tokens: int, chars: int) -> None:
                run.lock.ensure()  # after every batch: a lock that cannot be renewed stops the run
                progress(docs, tokens, chars)

            try:
                for spec in run.todo:
                    run.lock.check()
                    run_shard(job, spec, rt, run.out, step)
                    progress.shard_done(spec.index)
                    run.done(spec.index)
            finally:
                progress.close()
            faults.point("last")
    return run.summary()
