"""The output lock: one run writes to an output folder at a time.

`_lock` is created with O_EXCL and records host, pid, run id and start time; its holder touches
it every `lease / 4` seconds. A second run is refused with a message naming the holder. A lock
is stale when its pid is dead on this host, or when it has not been touched for `lease` seconds
(a holder on another host that died); a stale lock is taken over, and the takeover reported.
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

log = logging.getLogger("attnpipe")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, out: Path, lease: float = 900.0):
        self.out, self.lease = Path(out), lease
        self.path = self.out / paths.LOCK
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "run_id": os.urandom(6).hex(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            if self._try_create():
                self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="attnpipe-lock")
                self._thread.start()
                return
            holder, age = self._read_holder()
            if holder is None:
                continue  # released between our attempt and the read
            stale = self._stale_reason(holder, age)
            if stale is None:
                raise OutputError(
                    f"{self.out} is being written by another run (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {holder.get('started')}); wait for it to finish, or "
                    f"if it is dead remove {self.path}")
            self._take_over(holder, stale)
        raise OutputError(f"could not take the lock {self.path}; another run keeps taking it")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot write to output folder {self.out}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.info) + "\n")
        return True

    def _read_holder(self) -> tuple[dict | None, float]:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        try:
            return json.loads(text), age
        except ValueError:
            return {"host": "?", "pid": "?", "started": "?"}, age  # torn write: judge by age

    def _stale_reason(self, holder: dict, age: float) -> str | None:
        if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        if age > self.lease:
            return f"it was last renewed {age:.0f} s ago (lease {self.lease:.0f} s)"
        return None

    def _take_over(self, holder: dict, reason: str) -> None:
        # Rename, not unlink: of several runs taking over at once only one rename succeeds.
        grave = self.path.with_name(f"{paths.LOCK}.stale-{self.info['run_id']}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        grave.unlink(missing_ok=True)
        log.warning("took over the lock of %s from a dead run (host %s, pid %s, started %s): %s",
                    self.out, holder.get("host"), holder.get("pid"), holder.get("started"), reason)

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.lease / 4, 0.05)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if json.loads(self.path.read_text()).get("run_id") == self.info["run_id"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def check(self) -> None:
        """Raise if the lock is no longer ours (taken over after a long stall)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("run_id") != self.info["run_id"]:
            raise OutputError(f"lost the lock of {self.out} to another run (host {holder.get('host')}, "
                              f"pid {holder.get('pid')}); stopping without committing")
