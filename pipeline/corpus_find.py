"""Which local files a corpus is: a folder's files (not its subfolders), a glob (`**` matches any
depth, as in datasets' data_files), symlinks followed once and refused when broken or looping.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
from pathlib import Path

from .errors import CorpusError

WILDCARDS = "*?["


def broken_link(path: Path) -> str | None:
    """Why `path` (which exists as a name) cannot be opened: a dangling symlink or a loop."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        target = os.readlink(path) if os.path.islink(path) else "?"
        return f"is a dangling symlink (to {target})" if os.path.islink(path) else f"cannot be read: {exc.strerror}"


def _usable(paths: list[Path], where: str) -> list[Path]:
    """The files among `paths` (folders skipped); a broken link is refused, not skipped."""
    out = []
    for p in paths:
        problem = broken_link(p)
        if problem:
            raise CorpusError(f"corpus {where}: {p} {problem}; remove it or fix the link")
        if p.is_file():
            out.append(p)
    return out


def _glob_root(path: Path) -> Path:
    """The folder a pattern's wildcards start below: the parent of its first wildcard part."""
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in WILDCARDS))
    return Path(*parts[:first]) if first else Path(".")


def _match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Glob matching by path component: `**` is any number of folders; names starting with '.'
    match only a pattern part that starts with '.' (as glob)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return bool(parts) and (not parts[0].startswith(".") or pattern[0].startswith(".")) \
        and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _walk(root: Path, pattern: tuple[str, ...], where: str) -> list[Path]:
    """Files under `root` matching a `**` pattern. Symlinked folders are followed once: a link
    back to a folder already walked (a loop) is refused rather than walked forty levels deep."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=None):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            raise CorpusError(f"corpus {where}: {folder} is a symlink to a folder that is already part of the "
                              "corpus (a loop); remove the link or narrow the pattern")
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not broken_link(Path(folder) / d))
        rel = Path(folder).relative_to(root).parts
        found += [Path(folder) / n for n in names if _match(rel + (n,), pattern)]
    return sorted(found)


def pattern_files(path: Path, where: str) -> tuple[list[Path], Path]:
    root = _glob_root(path)
    if "**" in path.parts:
        files = _walk(root, path.relative_to(root).parts, where) if root.is_dir() else []
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)))
    return _usable(files, where), root


def folder_files(path: Path, suffixes) -> list[Path]:
    """The corpus files of a folder (not its subfolders), by name."""
    entries = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    return _usable(entries, f"folder {path}")
