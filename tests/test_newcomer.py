"""Issue 12's "done when", as a newcomer would do it: the package builds as a wheel that imports
as `attnpipe` only; one sentence's attention is looked at in Python; then the same recipes run
over a folder of .txt files (one document per file), the run is stopped halfway by SIGTERM, the
project folder is moved, and the rerun resumes with exactly an uninterrupted run's rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq

import attnpipe
from attnpipe.store import committed_files

REPO = Path(__file__).resolve().parents[1]
RECIPES = [{"name": "head_stats"}, {"name": "topk", "k": 4, "per_head": False}]
TOML_RECIPES = '[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 4\nper_head = false\n'


def test_wheel_installs_attnpipe_only(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build would leave build/ in the repository
    for folder in ("pipeline", "schemas"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("attnpipe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "attnpipe/__init__.py" in names and "attnpipe/read/assets/head_view.js" in names
    assert {f"attnpipe/_schemas/{t}.json" for t in ("edges", "documents", "tokens")} <= set(names)
    assert not any(n.startswith("pipeline/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "attnpipe = attnpipe.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def _project(root: Path, model: Path) -> Path:
    docs = root / "notes"
    docs.mkdir(parents=True)
    for i in range(8):  # files with paragraphs and blank lines: each file is one document
        (docs / f"note-{i:02d}.txt").write_text(f"Note {i}.\n\nThe river rose {i} feet overnight.\nIt fell again.\n")
    shutil.copytree(model, root / "model")
    (root / "job.toml").write_text('name = "notes"\n[corpus]\npath = "notes"\n[model]\nname = "model"\n'
                                   'max_length = 32\nstride = 4\n[run]\nnum_shards = 4\ndevice = "cpu"\n'
                                   'progress = false\n' + TOML_RECIPES)
    return root / "job.toml"


def _cli(args: list, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "attnpipe.cli", *map(str, args)], env=environ,
                          capture_output=True, text=True, timeout=300)


def _rows(out: Path) -> dict[str, list]:
    return {t: sorted(map(str, (r for f in committed_files(out, t) for r in
                                pq.read_table(f).drop_columns(["shard"] if t == "documents" else []).to_pylist())))
            for t in ("documents", "tokens", "head_stats", "edges")}


def test_sentence_then_folder_stopped_moved_and_resumed(tmp_path, tiny_model_dir):
    model = tiny_model_dir("bert")
    with attnpipe.attend("The river rose overnight.", model=str(model), recipes=RECIPES, device="cpu") as att:
        assert att.sql("SELECT count(*) AS n FROM edges_tokens WHERE recipe_label = 'topk_k4_mean'").n[0] > 0

    reference = _cli(["run", _project(tmp_path / "ref", model), "-o", tmp_path / "ref-out", "-q"])
    assert reference.returncode == 0, reference.stderr

    job = _project(tmp_path / "project", model)
    out = tmp_path / "attn"
    stopped = _cli(["run", job, "-o", out], ATTNPIPE_FAULT="commit:2", ATTNPIPE_FAULT_SIGNAL="TERM")
    assert stopped.returncode == 143 and "stopped by SIGTERM" in stopped.stderr, stopped.stderr
    assert 1 <= len(list((out / "_commits").glob("shard-*.json"))) < 4
    assert not (out / "_lock").exists()

    shutil.move(tmp_path / "project", tmp_path / "moved" / "project")
    resumed = _cli(["run", tmp_path / "moved" / "project" / "job.toml", "-o", out])
    assert resumed.returncode == 0, resumed.stderr
    assert "already committed" in resumed.stdout
    assert _rows(out) == _rows(tmp_path / "ref-out")
    documents = attnpipe.open_dataset(out).to_pandas("documents")
    assert sorted(documents.source_file) == [f"note-{i:02d}.txt" for i in range(8)]
    assert _cli(["verify", out]).returncode == 0
