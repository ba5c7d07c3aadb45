"""The output lock: one run writes to an output folder at a time.

`_lock` is created exclusively and records host, pid, run id and start time; its holder renews
it every `lease / 4` seconds. A second run is refused with a message naming the holder. A lock
held on this host is judged by its pid alone: stale when that process is gone, never while it
lives, whatever the lease (a stalled run or a tiny lease must not let a second run in beside
it). The lease only judges holders on other hosts, whose pid cannot be asked: a lock not renewed
for `lease` seconds is theirs no more. A stale lock is taken over, and the takeover reported.

A renewal that fails (anything but a passing I/O error) is kept in `failure`; the run asks
`ensure()` between batches and stops with one line instead of writing on without a live lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import OutputError
from . import paths
from .location import Location, as_location

log = logging.getLogger("attnpipe")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_pid_alive = pid_alive  # the name status.py imports


def stale_reason(holder: dict, age: float, lease: float) -> str | None:
    """Why a lock held by `holder`, last renewed `age` seconds ago, is stale (None: it is not)."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if pid_alive(holder["pid"]):
            return None  # alive here: its lease does not matter
        return f"its process {holder['pid']} on this host is gone"
    if age > lease:
        return f"it was last renewed {age:.0f} s ago (lease {lease:.0f} s)"
    return None


class OutputLock:
    def __init__(self, out: Location | Path | str, lease: float = 900.0):
        self.loc, self.lease = as_location(out), lease
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "run_id": os.urandom(6).hex(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why renewing failed, set by the renewal thread

    @property
    def path(self) -> Path:
        """The lock file of a local output."""
        return Path(self.loc.path(paths.LOCK))

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def held(self) -> bool:
        """Whether the lock file is there and ours."""
        holder, _ = self._read_holder()
        return bool(holder) and holder.get("run_id") == self.info["run_id"]

    def acquire(self) -> None:
        for _ in range(3):
            if self.loc.create_exclusive(paths.LOCK, (json.dumps(self.info) + "\n").encode()):
                self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="attnpipe-lock")
                self._thread.start()
                return
            stale = self.refuse_if_held()
            if stale is not None:
                self._take_over(*stale)
        raise OutputError(f"could not take the lock {self.loc.url(paths.LOCK)}; another run keeps taking it")

    def refuse_if_held(self) -> tuple[dict, str] | None:
        """Raise when a live run holds the lock; else (holder, why it is stale), or None when
        there is no lock (never taken, or released between our attempt and the read)."""
        holder, age = self._read_holder()
        if holder is None:
            return None
        stale = stale_reason(holder, age, self.lease)
        if stale is None:
            raise OutputError(
                f"{self.loc} is being written by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')}); wait for it to finish, or "
                f"if it is dead remove {self.loc.url(paths.LOCK)}")
        return holder, stale

    def _read_holder(self) -> tuple[dict | None, float]:
        try:
            text = self.loc.read_text(paths.LOCK)
            age = self.loc.age(paths.LOCK)
        except FileNotFoundError:
            return None, 0.0
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):
            return {"host": "?", "pid": "?", "started": "?"}, age  # torn write: judge by age
        return holder, age

    def _take_over(self, holder: dict, reason: str) -> None:
        # Rename, not delete: of several runs taking over at once only one rename succeeds.
        grave = f"{paths.LOCK}.stale-{self.info['run_id']}"
        try:
            self.loc.rename(paths.LOCK, grave)
        except FileNotFoundError:
            return
        self.loc.rm(grave)
        log.warning("took over the lock of %s from a dead run (host %s, pid %s, started %s): %s",
                    self.loc, holder.get("host"), holder.get("pid"), holder.get("started"), reason)

    def _heartbeat(self) -> None:
        # Nothing may escape this thread: an exception here would print a traceback and leave
        # the run going on, unrenewed. It is kept for ensure() to raise in the run's own thread.
        try:
            while not self._stop.wait(max(self.lease / 4, 0.05)):
                try:
                    if not self.held():
                        return  # taken over or removed: check() says so before the next shard
                    self.loc.touch(paths.LOCK)
                except OSError:
                    pass  # a passing storage error: the next renewal tries again
        except Exception as exc:  # noqa: BLE001 - reported by ensure()
            text = str(exc).strip().splitlines()
            self.failure = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

    def ensure(self) -> None:
        """Raise if renewing the lock failed (cheap: no I/O; called between batches)."""
        if self.failure:
            raise OutputError(f"the lock of {self.loc} could not be renewed ({self.failure}, lease "
                              f"{self.lease} s); stopped: shards committed before this are kept, and a "
                              "rerun continues from them")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if self.held():
                self.loc.rm(paths.LOCK)
        except (OSError, ValueError):
            pass

    def check(self) -> None:
        """Raise if the lock is no longer ours (taken over after a long stall) or could not be
        renewed."""
        self.ensure()
        holder, _ = self._read_holder()
        if not holder or holder.get("run_id") != self.info["run_id"]:
            holder = holder or {}
            raise OutputError(f"lost the lock of {self.loc} to another run (host {holder.get('host')}, "
                              f"pid {holder.get('pid')}); stopping without committing")
