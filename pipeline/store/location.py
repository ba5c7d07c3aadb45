"""Where a dataset lives: a local folder, or any fsspec URL (s3://, gs://, memory://, ...).

Every file operation of the store goes through a `Location`, so the commit protocol reads the
same everywhere. Locally it uses the operating system directly: renames are atomic and files
and folders are fsynced before a record is written. Elsewhere it uses fsspec: a record is one
`pipe` (a single PUT on object stores, which readers see whole or not at all); data files are
written to a local staging folder and uploaded before the record. Install the filesystem's
package (s3fs, gcsfs, ...) to use its URLs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from ..errors import OutputError


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entries: renames and new files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Location:
    """A folder: `rel` arguments are '/'-separated paths relative to it."""

    def __init__(self, target: "str | Path | Location"):
        if isinstance(target, Location):
            self.fs, self.root, self.protocol = target.fs, target.root, target.protocol
            return
        text = str(target)
        if "://" in text and not text.startswith("file://"):
            try:
                from fsspec.core import url_to_fs

                self.fs, self.root = url_to_fs(text)
            except (ImportError, ValueError) as exc:
                raise OutputError(f"output {text}: no filesystem for this URL ({exc}); install the "
                                  "fsspec package for it (s3fs for s3://, gcsfs for gs://, ...)") from None
            self.root = self.root.rstrip("/") or "/"
            self.protocol = text.split("://", 1)[0]
        else:
            self.fs, self.protocol = None, "file"
            self.root = str(Path(text.removeprefix("file://")))

    # -- naming ---------------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, rel: str | PurePosixPath = "") -> str:
        """The full path of `rel` (local path, or the filesystem's path without protocol)."""
        rel = str(rel)
        if not rel or rel == ".":
            return self.root
        return os.path.join(self.root, rel) if self.local else f"{self.root}/{rel}".replace("//", "/")

    def url(self, rel: str | PurePosixPath = "") -> str:
        """How to show `rel` to a user, or hand it to another program."""
        return self.path(rel) if self.local else f"{self.protocol}://{self.path(rel).lstrip('/')}"

    def child(self, rel: str) -> "Location":
        loc = Location(self)
        loc.root = self.path(rel)
        return loc

    def parent_chain(self) -> list["Location"]:
        """This folder and its parents that do not exist yet (the folders a run would create)."""
        if not self.local:
            return []
        return [Location(p) for p in [Path(self.root), *Path(self.root).parents] if not p.exists()]

    def __str__(self) -> str:
        return self.url()

    def __repr__(self) -> str:
        return f"Location({self.url()!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.protocol, self.root) == (other.protocol, other.root)

    def __hash__(self) -> int:
        return hash((self.protocol, self.root))

    # -- queries ----------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return os.path.exists(self.path(rel)) if self.local else self.fs.exists(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return os.path.isdir(self.path(rel)) if self.local else self.fs.isdir(self.path(rel))

    def isfile(self, rel: str = "") -> bool:
        return os.path.isfile(self.path(rel)) if self.local else self.fs.isfile(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names in a folder ([] when it does not exist)."""
        if not self.isdir(rel):
            return []
        if self.local:
            return sorted(os.listdir(self.path(rel)))
        return sorted(PurePosixPath(p).name for p in self.fs.ls(self.path(rel), detail=False))

    def find(self, rel: str = "") -> list[str]:
        """Every file under `rel`, as paths relative to this location, sorted."""
        if not self.isdir(rel):
            return []
        if self.local:
            base = Path(self.root)
            return sorted(str(p.relative_to(base)) for p in Path(self.path(rel)).rglob("*") if p.is_file())
        root = self.path().rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p.lstrip("/")[len(root.lstrip("/")):]
                      for p in self.fs.find(self.path(rel)))

    def size(self, rel: str) -> int:
        return os.path.getsize(self.path(rel)) if self.local else int(self.fs.size(self.path(rel)))

    def age(self, rel: str) -> float:
        """Seconds since `rel` was last modified."""
        if self.local:
            return time.time() - os.path.getmtime(self.path(rel))
        return time.time() - self.fs.modified(self.path(rel)).timestamp()

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as fh:
                return fh.read()
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb"):
        return open(self.path(rel), mode) if self.local else self.fs.open(self.path(rel), mode)

    # -- changes ----------------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        else:
            self.fs.makedirs(self.path(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes, before_rename=None) -> None:
        """Readers see the old content or the new, never a part: locally a temp file, fsync,
        rename and fsync of the folder; elsewhere one put of the whole object."""
        if not self.local:
            self.fs.pipe_file(self.path(rel), data)
            return
        target = self.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if before_rename:
                before_rename()
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_path(os.path.dirname(target))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if it does not exist; False when it does."""
        if self.local:
            try:
                fd = os.open(self.path(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            with self.fs.open(self.path(rel), "xb") as fh:
                fh.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive create here: check, write, read back
            if self.fs.exists(self.path(rel)):
                return False
            self.fs.pipe_file(self.path(rel), data)
            return self.fs.cat_file(self.path(rel)) == data

    def put(self, local_file: str | Path, rel: str) -> None:
        """Move a finished local file to `rel` (a rename locally, an upload elsewhere)."""
        if self.local:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            os.replace(local_file, self.path(rel))
        else:
            self.fs.put_file(str(local_file), self.path(rel))

    def sync_dirs(self, rels: list[str]) -> None:
        if self.local:
            for folder in sorted({os.path.dirname(self.path(r)) for r in rels}):
                fsync_path(folder)

    def rename(self, rel: str, new_rel: str) -> None:
        if self.local:
            os.rename(self.path(rel), self.path(new_rel))
        else:
            self.fs.mv(self.path(rel), self.path(new_rel))

    def touch(self, rel: str) -> None:
        if self.local:
            os.utime(self.path(rel))
        else:
            self.fs.pipe_file(self.path(rel), self.fs.cat_file(self.path(rel)))

    def rm(self, rel: str) -> None:
        """Delete a file; a missing one is fine."""
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def rmtree(self, rel: str = "") -> None:
        if self.local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def rmdir(self, rel: str = "") -> None:
        """Remove an empty folder; a folder that is not empty stays."""
        try:
            if self.local:
                os.rmdir(self.path(rel))
            elif not self.fs.ls(self.path(rel), detail=False):
                self.fs.rmdir(self.path(rel))
        except OSError:
            pass

    def staging_root(self) -> tuple[Path, bool]:
        """(a local folder for staging files, whether it is a temporary one): beside the data
        locally, so that publishing is a rename; a temporary local folder for remote outputs."""
        if self.local:
            return Path(self.root), False
        return Path(tempfile.mkdtemp(prefix="attnpipe-staging-")), True

    def arrow_filesystem(self):
        """A pyarrow filesystem for this location's paths (`self.path(rel)`)."""
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def as_location(target: "str | Path | Location") -> Location:
    return target if isinstance(target, Location) else Location(target)
