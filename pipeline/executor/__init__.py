"""Executors schedule shards and never compute: `local` runs them in this process, `dask` as
tasks on a Dask cluster. Both share the driver in `base.py` and the step `pipeline.shard`."""

from __future__ import annotations


def run(job, quiet: bool = False, new_run: bool = False):
    """Run `job` with the executor its `run.executor` names."""
    if job.run.executor == "dask":
        from .dask import run_job_dask

        return run_job_dask(job, quiet=quiet, new_run=new_run)
    from .local import run_job

    return run_job(job, quiet=quiet, new_run=new_run)
