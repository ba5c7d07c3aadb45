"""Run a job on Dask (`dask.distributed`): each shard is a task.

The driver (this process) plans, holds the output's lock and follows progress; it never loads
the model and never holds rows. Each worker builds the job's runtime once (model, tokenizer,
corpus), keeps it for every shard it gets, and runs the same step as the local executor,
writing its shard's files and commit record straight to the output folder, which must
therefore be storage that every worker sees (a shared file system across machines).

Clusters: `run.scheduler` joins an existing one (`dask scheduler` + `dask worker` on each node,
dask-jobqueue, dask-kubernetes); otherwise a local one of `run.workers` processes, one per GPU
with dask-cuda when CUDA is present.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import faults
from ..errors import AttnpipeError
from ..hub import model_weights_id
from ..job import JobSpec
from ..store.dataset import recover
from ..store.plan import ShardSpec
from .base import JobRun, Progress, RunSummary, one_line

log = logging.getLogger("attnpipe")
_RUNTIMES: dict[str, object] = {}  # per worker process: the job's runtime, by job fingerprint


class ExecutorError(AttnpipeError):
    """The Dask cluster cannot be started or reached."""


def shard_task(job: JobSpec, spec: ShardSpec, out: str, threads: int | None, quiet: bool = False) -> dict:
    """One shard on a worker; returns counts only (the rows went to the output folder)."""
    from ..runtime import Runtime, quiet_libraries
    from ..shard import run_shard

    key = job.fingerprint()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one model per worker at a time
        quiet_libraries(quiet)  # the driver's bar is the progress: no library bars from workers
        if threads:
            import torch

            torch.set_num_threads(threads)
        _RUNTIMES[key] = Runtime.build(job)
    result = run_shard(job, spec, _RUNTIMES[key], out)
    return {"shard": result.shard, "documents": result.documents, "tokens": result.tokens,
            "seconds": result.seconds, "host": os.uname().nodename, "pid": os.getpid()}


@contextmanager
def client_for(job: JobSpec) -> Iterator[tuple[object, str, int | None]]:
    """(client, description, torch threads per worker) for the job's cluster."""
    from distributed import Client, LocalCluster

    if job.run.scheduler:
        try:
            client = Client(job.run.scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ExecutorError(f"run.scheduler: cannot reach the Dask scheduler at {job.run.scheduler} "
                                f"({one_line(exc)}); start it with `dask scheduler` and workers with "
                                "`dask worker ADDRESS`") from None
        with client:
            yield client, f"dask {job.run.scheduler}", None
        return
    cluster = _local_cuda_cluster(job) if job.run.device != "cpu" else None
    if cluster is None:
        workers = job.run.workers or max(1, min(4, os.cpu_count() or 1))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        threads = max(1, (os.cpu_count() or 1) // workers)
        where = f"dask, {workers} local workers"
    else:
        threads, where = None, f"dask-cuda, {len(cluster.workers)} GPU workers"
    with cluster, Client(cluster) as client:
        yield client, where, threads


def _local_cuda_cluster(job: JobSpec):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return LocalCUDACluster(n_workers=job.run.workers, dashboard_address=":0", silence_logs=logging.ERROR)


def run_job_dask(job: JobSpec, quiet: bool = False, new_run: bool = False) -> RunSummary:
    with JobRun(job, new_run) as run:
        if run.todo:
            # A factory's weights are known once its code has run, on the workers (as an unpinned hub model's)
            run.begin(None if job.model.factory else model_weights_id(job.model.name, Path(job.base_dir),
                                                                      job.model.revision))
            own_cluster, over = not job.run.scheduler, False
            if quiet:
                quiet_dask()
            try:
                with client_for(job) as (client, where, threads):
                    progress = Progress(job, run.corpus, run.todo, where, quiet)
                    futures = {client.submit(shard_task, job, spec, run.out.url(), threads, quiet,
                                             retries=job.run.retries, pure=False,
                                             key=f"attnpipe-{run.fingerprint}-shard-{spec.index}"): spec
                               for spec in run.todo}
                    try:
                        follow(run, futures, progress, where)
                    except BaseException:
                        client.cancel(list(futures))  # stopped (Ctrl-C, SIGTERM, a lost lock)
                        raise
                    finally:
                        progress.close()
                over = True
            finally:
                # Attempts killed on a worker leave staging and unrecorded files. They can go
                # while the lock is ours and no task runs any more: every task is over, or our
                # own cluster is shut down. An external cluster may still run a cancelled task.
                if over or own_cluster:
                    recover(run.out)
            faults.point("last")
    run.raise_failures()
    return run.summary()


def quiet_dask() -> None:
    """--quiet: nothing library-side. The resource tracker (a process of its own, started with
    this interpreter's -W options) warns of "leaked semaphore objects" after a worker dies."""
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    warnings.filterwarnings("ignore", module="multiprocessing.resource_tracker")
    logging.getLogger("distributed").setLevel(logging.ERROR)


def follow(run: JobRun, futures: dict, progress: Progress, where: str) -> None:
    """Record each shard as its task ends. Waits a second at a time, so that a lock that can no
    longer be renewed stops the run while tasks are still running."""
    from distributed import wait

    pending = set(futures)
    while pending:
        run.lock.ensure()
        try:
            done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:
            continue
        for future in sorted(done, key=lambda f: futures[f].index):
            spec = futures[future]
            if future.status == "finished":
                info = future.result()
                progress(info["documents"], info["tokens"])
                progress.shard_done(spec.index)
                run.done(spec.index)
            else:
                progress.shard_done(spec.index, failed=True)
                run.failed(spec, one_line(future.exception()), run.job.run.retries + 1, where)
