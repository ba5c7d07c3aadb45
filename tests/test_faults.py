"""Crash safety of the commit protocol, on real runs.

Each case starts `attnpipe run` in a subprocess that SIGKILLs itself at a fault point
(ATTNPIPE_FAULT, pipeline/faults.py), checks what the kill left, reruns the same command without
the fault, and compares every table, read from the committed files only, with an uninterrupted
run of the same job into another folder. A full disk (simulated in-process, and for real on a
1 MB tmpfs where mounting one is allowed) must give one line, no record for the failed shard
and nothing of it on disk.

The subprocess runs of all cases start together on a small pool (module fixture `runs`), so the
file takes about as long as its longest case, not the sum of them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from attnpipe.cli import cli
from attnpipe.store import committed_files, read_records

from conftest import write_job

REPO = Path(__file__).resolve().parents[1]
TABLES = ("documents", "tokens", "words", "head_stats", "edges", "rollout")
NUM_SHARDS = 3
KEYS = {  # what makes a row unique in each table
    "documents": ["doc_id"],
    "tokens": ["doc_id", "window_index", "position"],
    "words": ["doc_id", "window_index", "word_index"],
    "head_stats": ["doc_id", "window_index", "layer", "head", "recipe", "recipe_params"],
    "edges": ["doc_id", "window_index", "layer", "head", "query_pos", "key_pos", "recipe", "recipe_params"],
    "rollout": ["doc_id", "window_index", "layer", "query_pos", "key_pos", "recipe", "recipe_params"],
}
RECIPES = """
[[recipes]]
name = "head_stats"
[[recipes]]
name = "topk"
k = 3
per_head = true
[[recipes]]
name = "rollout"
k = 3
"""
WORDS = "fox cat dog owl bee ant elk yak emu cow pig hen".split()
SHORT = [f"Note {i}: the {w} crossed the cold river at dawn" + ", and then it rested" * (i % 4) + "."
         for i, w in enumerate(WORDS)]
LONG = " ".join(f"Sentence number {i} talks about the river, the hills and the old mill." for i in range(16))
TEXTS = SHORT[:6] + [LONG] + SHORT[6:]  # 13 documents: shards of 5, 4 and 4; the long one in shard 1

# Each case: the faults of the killed runs, in order; then one clean rerun.
CASES = {
    "load": ["load"],  # model loaded, nothing written yet
    "batch": ["batch:3"],  # mid-shard: rows of shard 0 in the writer, nothing published
    "publish": ["publish:2"],  # two files of shard 0 renamed into place, no record
    "record": ["record"],  # shard 0's record written to its temp file, not renamed
    "commit": ["commit:1"],  # between shards: shard 0 committed
    "last": ["last"],  # every shard committed, before the manifest and the lock release
    "twice": ["publish:2", "record:2"],  # second run recovers, commits shard 0, dies in shard 1's record
}


@dataclass
class Env:
    base: Path
    corpus: Path
    model: Path

    def job(self, name: str, base: Path | None = None, out: Path | None = None) -> tuple[Path, Path]:
        """(job file, output folder) of the fault-test job, in its own folder."""
        folder = (base or self.base) / name
        folder.mkdir(parents=True, exist_ok=True)
        out = out or folder / "out"
        job = write_job(folder, self.corpus, self.model, recipes=RECIPES, extra='id_column = "id"',
                        output=str(out), num_shards=NUM_SHARDS, batch_tokens=32, device="cpu")
        return job, out


@dataclass
class State:
    """What a killed run left in its output folder."""

    rc: int
    stderr: str
    exists: bool = False
    records: list[int] = field(default_factory=list)
    staging: bool = False
    lock: bool = False
    dataset: bool = False
    record_tmp: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # data files no record lists


@dataclass
class Case:
    killed: list[State]
    rerun: subprocess.CompletedProcess
    out: Path


def attnpipe(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ATTNPIPE_FAULT", None)
    if fault:
        env["ATTNPIPE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "attnpipe.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def table_files(out: Path) -> list[str]:
    """Every file under the table folders, relative to `out` (found by walking, not from records)."""
    return sorted(str(p.relative_to(out)) for t in (*TABLES, "maps") if (out / t).is_dir()
                  for p in (out / t).rglob("*") if p.is_file())


def listed(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in committed_files(out)}


def snapshot(out: Path, proc: subprocess.CompletedProcess) -> State:
    state = State(proc.returncode, proc.stderr, out.is_dir())
    if not out.is_dir():
        return state
    state.records = sorted(read_records(out))
    state.staging = (out / "_staging").exists()
    state.lock = (out / "_lock").exists()
    state.dataset = (out / "_dataset.json").exists()
    commits = out / "_commits"
    state.record_tmp = sorted(p.name for p in commits.iterdir() if p.name.endswith(".tmp")) if commits.is_dir() else []
    state.unlisted = sorted(set(table_files(out)) - listed(out))
    return state


def run_case(env: Env, name: str) -> Case:
    job, out = env.job(name)
    args = ["run", str(job), "--quiet"]
    killed = []
    for fault in CASES[name]:
        proc = attnpipe(args, fault)
        killed.append(snapshot(out, proc))
        if proc.returncode != -9:  # the rest of the case means nothing; the test reports this one
            break
    return Case(killed, attnpipe(args), out)


def read_table(out: Path, table: str) -> pa.Table:
    files = committed_files(out, table)
    assert files, f"{out} has no committed {table} files"
    return pa.concat_tables([pq.read_table(f) for f in files]).combine_chunks()


def assert_same_rows(out: Path, reference: Path) -> None:
    """Every table of `out` holds exactly the rows of `reference`, on all columns, floats bit
    for bit (the model runs deterministically on CPU; NaN equals NaN)."""
    for table in TABLES:
        got, want = read_table(out, table), read_table(reference, table)
        assert got.schema.remove_metadata().equals(want.schema.remove_metadata()), table
        assert got.num_rows == want.num_rows, (table, got.num_rows, want.num_rows)
        floats = [c for c in want.column_names if pa.types.is_floating(want.schema.field(c).type)]
        order = [(c, "ascending") for c in [*(c for c in want.column_names if c not in floats), *floats]]
        got, want = got.sort_by(order), want.sort_by(order)
        for column in want.column_names:
            if column in floats:
                np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy(),
                                              err_msg=f"{table}.{column}")
            else:
                assert got[column].to_pylist() == want[column].to_pylist(), f"{table}.{column} differs"


def assert_clean(out: Path, num_shards: int = NUM_SHARDS) -> None:
    """A finished output: all records, no staging, lock or temp files, nothing no record lists,
    no duplicated keys, and `attnpipe verify` passes."""
    assert sorted(read_records(out)) == list(range(num_shards))
    assert not (out / "_staging").exists(), "a _staging folder was left"
    assert not (out / "_lock").exists(), "the _lock was left"
    names = listed(out)
    assert set(table_files(out)) == names, f"files no record lists: {sorted(set(table_files(out)) - names)}"
    meta = {"_dataset.json", "_manifest.json", *(f"_commits/shard-{s:05d}.json" for s in range(num_shards))}
    others = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                    and str(p.relative_to(out)) not in names | meta)
    assert not others, f"left in {out}: {others}"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["committed"] == f"{num_shards}/{num_shards}"
    for table in TABLES:
        rows = read_table(out, table).select(KEYS[table]).to_pandas()
        assert not rows.duplicated().any(), f"duplicated {table} rows: {rows[rows.duplicated()].head()}"
        assert manifest["totals"]["rows"][table] == len(rows)
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir) -> Env:
    base = tmp_path_factory.mktemp("faults")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return Env(base, corpus, tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def runs(request, env):
    """Starts the reference run and the cases the session selected, two processes at a time."""
    chosen = {item.callspec.params["case"] for item in request.session.items
              if item.originalname == "test_kill_then_rerun" and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(max_workers=2)
    job, out = env.job("reference")
    futures: dict[str, Future] = {"reference": pool.submit(attnpipe, ["run", str(job), "--quiet"])}
    futures.update({name: pool.submit(run_case, env, name) for name in CASES if name in chosen})
    yield futures, out
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    futures, out = runs
    proc = futures["reference"].result()
    assert proc.returncode == 0, proc.stderr
    assert_clean(out)
    return out


@pytest.fixture
def restore_logger():
    """The CLI points the 'attnpipe' logger at click; put it back for the tests that follow."""
    log = logging.getLogger("attnpipe")
    saved = log.handlers[:], log.level, log.propagate
    yield
    log.handlers[:], log.level, log.propagate = saved


# ---------------------------------------------------------------- kill, then rerun


def check_killed(name: str, states: list[State]) -> None:
    """The kill happened where its point says, and left what the protocol allows."""
    for s in states:
        assert s.rc == -9, f"expected a SIGKILL, got rc {s.rc}: {s.stderr[-2000:]}"
        assert s.lock, "a killed run cannot remove its lock"
    first = states[0]
    if name == "load":
        assert first.records == [] and not first.dataset and not first.staging
    elif name == "batch":
        assert first.records == [] and first.staging and first.unlisted == []
    elif name in ("publish", "twice"):
        assert first.records == [] and first.staging and len(first.unlisted) == 2
    elif name == "record":
        assert first.records == [] and len(first.record_tmp) == 1 and len(first.unlisted) == 9  # the shard's files, words included
    elif name == "commit":
        assert first.records == [0] and first.unlisted == [] and not first.staging
    elif name == "last":
        assert first.records == [0, 1, 2] and first.unlisted == [] and not first.staging
    if name == "twice":
        second = states[1]  # recovered the first kill, committed shard 0, died writing shard 1's record
        assert second.records == [0] and len(second.record_tmp) == 1 and len(second.unlisted) == 9
        assert all("/shard-00001-" in n for n in second.unlisted), second.unlisted


@pytest.mark.parametrize("case", list(CASES))
def test_kill_then_rerun(case, runs, reference):
    """SIGKILL at a fault point (twice, for 'twice'), rerun: the rows of an uninterrupted run."""
    result: Case = runs[0][case].result()
    check_killed(case, result.killed)
    rerun = result.rerun
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the lock" in rerun.stderr  # the dead run's lock, reported
    assert "Traceback" not in rerun.stderr
    assert_clean(result.out)
    assert_same_rows(result.out, reference)


# ---------------------------------------------------------------- a full disk


class DiskFull:
    """Raise ENOSPC from the chosen write of shard 1 (the second shard); shard 0 goes through."""

    def __init__(self, monkeypatch, where: str):
        self.where, self.hits = where, 0
        if where == "write_table":
            original = pq.ParquetWriter.write_table

            def write_table(writer, table, *args, **kwargs):
                if "shard-00001-" in str(writer.where):
                    self.fail()
                return original(writer, table, *args, **kwargs)

            monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
        else:
            original_replace = os.replace

            def replace(src, dst, *args, **kwargs):
                src, dst = str(src), str(dst)
                publish = where == "publish" and "_staging/shard-00001-" in src
                record = where == "record" and dst.endswith("_commits/shard-00001.json")
                if publish or record:
                    self.hits += 1
                    if where == "record" or self.hits == 2:  # publish: after one file went through
                        self.fail()
                return original_replace(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, "replace", replace)

    def fail(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def shard_traces(out: Path, shard: int) -> list[str]:
    """Every file or folder under `out` that belongs to `shard` (data, records, temp files)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if f"shard-{shard:05d}" in p.name)


@pytest.mark.parametrize("where", ["write_table", "publish", "record"])
def test_disk_full_one_line_no_record(where, env, reference, tmp_path, monkeypatch, restore_logger):
    job, out = env.job("full", tmp_path)
    full = DiskFull(monkeypatch, where)
    result = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert "\n" not in message and "No space left on device" in message, message
    assert "Traceback" not in message and str(out) in message
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(read_records(out)) == [0]  # shard 0 kept, shard 1 failed, shard 2 never started
    assert shard_traces(out, 1) == [] and shard_traces(out, 2) == []
    assert not (out / "_staging").exists() and not (out / "_lock").exists()
    assert set(table_files(out)) == listed(out)
    assert all(p.is_file() for p in committed_files(out))
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
    assert full.hits or where == "write_table"

    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_clean(out)
    assert_same_rows(out, reference)


# ---------------------------------------------------------------- a real full disk


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


PAGE = 4096


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_real_full_disk(env, reference, tiny_tmpfs, tmp_path, restore_logger):
    """On a 1 MB tmpfs filled so that only about one shard fits: one line, the committed shards
    intact and verified, nothing of the failed one; with room again, the rerun completes."""
    job, out = env.job("real", tmp_path, out=tiny_tmpfs / "out")
    def pages(*files: Path) -> int:  # tmpfs hands out whole pages
        return sum(-(-f.stat().st_size // PAGE) for f in files)

    def data(shard: int) -> list[Path]:
        return [f for f in committed_files(reference) if f.name.startswith(f"shard-{shard:05d}-")]

    # Room for shard 0, its record, the lock, _dataset.json and the manifest (each json with its
    # temp copy) and a little slack; shard 1's files need more than the slack.
    room = pages(*data(0), reference / "_dataset.json", reference / "_commits/shard-00000.json") \
        + 2 * pages(reference / "_manifest.json") + 1 + 4
    assert pages(*data(1)) > 4 + 2
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(free_bytes(tiny_tmpfs) - room * PAGE, 0))
    result = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert "\n" not in message and "No space left on device" in message and "Traceback" not in message, message
    assert sorted(read_records(out)) == [0]  # shard 0 fitted, shard 1 did not
    assert shard_traces(out, 1) == [] and shard_traces(out, 2) == []
    assert not (out / "_staging").exists() and not (out / "_lock").exists()
    assert set(table_files(out)) == listed(out)
    assert not list(out.rglob("*.tmp"))
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0

    filler.unlink()
    result = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_clean(out)
    assert_same_rows(out, reference)


# ---------------------------------------------------------------- a kill while writing _dataset.json


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_kill_while_writing_dataset_info(env, reference, tmp_path, restore_logger):
    """A run killed between the temp file of _dataset.json and its rename (before any commit)
    leaves only its lock and that temp file: the folder is still the job's, the rerun takes it
    over, deletes the temp file and completes."""
    job, out = env.job("info", tmp_path)
    out.mkdir()
    pid = dead_pid()
    (out / "_lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "run_id": "0" * 12,
                                           "started": "2026-01-01T00:00:00+0000"}) + "\n")
    (out / f"._dataset.json.{pid}.tmp").write_text('{"format_version": 2, "job_fing')
    result = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "took over the lock" in result.output
    assert_clean(out)
    assert_same_rows(out, reference)


# ---------------------------------------------------------------- SIGTERM and Ctrl-C


def stop_with(args: list[str], fault: str, signal_name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ATTNPIPE_FAULT": fault, "ATTNPIPE_FAULT_SIGNAL": signal_name}
    return subprocess.run([sys.executable, "-m", "attnpipe.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signal_name, fault, code", [("TERM", "batch:6", 143), ("INT", "publish:10", 130)])
def test_sigterm_stops_like_ctrl_c(signal_name, fault, code, env, reference, tmp_path):
    """SIGTERM (what schedulers send) in the middle of shard 1, as Ctrl-C: one line saying so,
    exit 128 + signal, shard 0 kept, nothing staged, no lock; the rerun completes."""
    job, out = env.job(f"stop-{signal_name}", tmp_path)
    proc = stop_with(["run", str(job), "--quiet"], fault, signal_name)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by " + ("SIGTERM" if code == 143 else "Ctrl-C")), lines
    assert sorted(read_records(out)) == [0]
    assert not (out / "_lock").exists() and not (out / "_staging").exists()
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code in (0, 1)  # strays allowed until the rerun
    rerun = attnpipe(["run", str(job), "--quiet"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the lock" not in rerun.stderr  # the stopped run released it
    assert_clean(out)
    assert_same_rows(out, reference)
