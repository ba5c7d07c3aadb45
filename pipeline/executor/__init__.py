"""Executors schedule shards and never compute: `local` runs them in this process, `dask` as
tasks on a Dask cluster. Both share the driver in `base.py` and the step `pipeline.shard`."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers, `kill` and `timeout` send), raised where the run stands so that
    it unwinds exactly as a Ctrl-C does: the shard in progress is removed, the shards committed
    before it are kept and the lock is released."""


def run(job, quiet: bool = False, new_run: bool = False):
    """Run `job` with the executor its `run.executor` names."""
    if job.run.executor == "dask":
        from .dask import run_job_dask

        return run_job_dask(job, quiet=quiet, new_run=new_run)
    from .local import run_job

    return run_job(job, quiet=quiet, new_run=new_run)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside: SIGTERM raises `Terminated` in the main thread (once; a second SIGTERM
    during the cleanup is ignored, a scheduler's SIGKILL after its grace period still ends it).
    Python only lets the main thread set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
