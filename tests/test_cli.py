"""The `attnpipe` command line through click's CliRunner (and two real processes): help for
everything, recipes and schema listings, run + inspect on a tiny model, one-line errors,
--debug tracebacks, --quiet, resumable reruns, refusing another job's output, and no
half-written files when a job fails before work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from attnpipe.cli import cli
from attnpipe.errors import AttnpipeError
from attnpipe.recipes import RECIPES
from attnpipe.store.schema import load_schemas

from conftest import error_line, invoke, write_job

REPO = Path(__file__).resolve().parents[1]
DOCS = [{"text": "The animal didn't cross the street because it was too tired.", "id": "d1", "topic": "a"},
        {"text": "Rain fell all night; by morning the road was a river.", "id": "d2", "topic": "b"},
        {"text": "Why do cats purr?", "id": "d3", "topic": "a"},
        {"text": "Short.", "id": "d4", "topic": "b"},
        {"text": "Glass was expensive, and large windows let out precious heat.", "id": "d5", "topic": "c"}]




def parquet_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.parquet")) if out.exists() else []


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture
def job(tmp_path, corpus, tiny_model_dir) -> Path:
    return write_job(tmp_path, corpus, model=tiny_model_dir("bert"), extra='id_column = "id"', device="cpu")


# --- help ------------------------------------------------------------------------------------

def _commands():
    return sorted(cli.commands.items())


def test_group_has_help():
    assert (cli.help or "").strip()
    result = invoke("--help")
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    command = cli.commands[name]
    assert (command.help or "").strip(), f"command {name!r} has no help text"
    assert command.get_short_help_str().strip()
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"option {param.opts} of {name!r} has no help"
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert command.help.split()[0] in result.output


def test_help_lists_every_command_with_its_short_help():
    result = invoke("--help")
    for name, command in _commands():
        line = next((l for l in result.output.splitlines() if l.strip().startswith(name + " ")), None)
        assert line is not None, name
        assert command.get_short_help_str().split()[0] in line


def test_short_help_flag():
    assert invoke("-h").exit_code == 0


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    from importlib.metadata import version

    assert version("attnpipe") in result.output


# --- recipes and schema ----------------------------------------------------------------------

def test_recipes_lists_every_recipe_with_its_doc():
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    for name, recipe in RECIPES.items():
        assert f"{name}  -> table '{recipe.table}'" in result.output
        assert recipe.doc, f"recipe {name} has no docstring"
        first = recipe.doc.splitlines()[0].strip()
        assert first in result.output
        for param in recipe.params.model_fields:
            assert f"param {param} =" in result.output


def test_schema_lists_every_table():
    result = invoke("schema")
    assert result.exit_code == 0, result.output
    for name, schema in load_schemas().items():
        assert f"{name} (v{schema.version}" in result.output
        for column in schema.columns:
            assert column["name"] in result.output


def test_schema_one_table():
    result = invoke("schema", "edges")
    assert result.exit_code == 0, result.output
    edges = load_schemas()["edges"]
    assert result.output.startswith("edges (v")
    assert "one folder per layer (layer-NNN)" in result.output
    for column in edges.columns:
        assert column["name"] in result.output
    for other in set(load_schemas()) - {"edges"}:
        assert not any(line.startswith(other + " (v") for line in result.output.splitlines())


def test_schema_json():
    result = invoke("schema", "documents", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["table"] == "documents"
    assert [c["name"] for c in data["columns"]][:3] == ["doc_id", "corpus_row", "shard"]
    assert data["version"] == load_schemas()["documents"].version


def test_schema_unknown_table():
    line = error_line(invoke("schema", "nosuchtable"))
    assert "'nosuchtable'" in line
    for name in load_schemas():
        assert name in line


# --- run and inspect -------------------------------------------------------------------------

def test_run_then_inspect(tmp_path, job):
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert f"wrote {out}: 1 shard run" in result.output
    assert "5 documents (0 empty)" in result.output
    for table in ("documents", "tokens", "head_stats"):
        assert table in result.output
    assert (out / "_manifest.json").is_file() and (out / "_dataset.json").is_file()
    assert (out / "_commits" / "shard-00000.json").is_file()
    assert len(list((out / "documents").glob("shard-00000-*-0.parquet"))) == 1
    assert {p.parent.name for p in (out / "head_stats").glob("layer-*/shard-00000-*.parquet")} == {
        "layer-000", "layer-001"}
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
    assert not (out / "_lock").exists()

    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "job 'test'" in text and "complete" in text and "1/1" in text
    assert "tables:" in text and "provenance:" in text
    for table in ("documents", "tokens", "head_stats"):
        assert any(line.strip().startswith(table) for line in text.splitlines()), table
    assert "        5 rows" in text or " 5 rows" in text  # documents
    assert "layers 0, 1" in text and "heads" in text
    assert "num_layers" in text and "num_heads" in text and "weights_sha256" in text
    assert f"head_stats v{RECIPES['head_stats'].version}" in text

    data = json.loads(invoke("inspect", out, "--json").output)
    assert data["tables"]["documents"]["rows"] == 5
    assert data["tables"]["head_stats"]["layers"] == [0, 1]
    assert data["tables"]["head_stats"]["heads"] == [0, 1, 2, 3]
    assert data["status"] == "complete" and data["shards"] == "1/1 committed"
    assert data["provenance"]["num_heads"] == 4
    assert data["provenance"]["job_fingerprint"]


def test_inspect_not_an_output_dir(tmp_path):
    line = error_line(invoke("inspect", tmp_path))
    assert str(tmp_path) in line and "_dataset.json" in line


def test_run_overrides(tmp_path, job):
    elsewhere = tmp_path / "elsewhere"
    result = invoke("run", job, "--limit", 3, "--num-shards", 2, "--output", elsewhere, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    manifest = json.loads((elsewhere / "_manifest.json").read_text())
    assert manifest["num_shards"] == 2 and sorted(manifest["shards"]) == ["0", "1"]
    assert sum(s["documents"] for s in manifest["shards"].values()) == 3
    assert manifest["job"]["corpus"]["limit"] == 3
    assert manifest["job"]["run"]["device"] == "cpu"
    assert manifest["job"]["run"]["num_shards"] == 2
    assert "2 shards run" in result.output and "3 documents" in result.output


def test_more_shards_than_documents(tmp_path, job):
    """A small corpus (or a small --limit) with many shards: every document once, no crash."""
    result = invoke("run", job, "--num-shards", 7)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        import pyarrow.dataset as pads

        docs = pads.dataset(tmp_path / "out" / "documents").to_table().column("doc_id").to_pylist()
        assert sorted(docs) == ["d1", "d2", "d3", "d4", "d5"]
    else:
        error_line(result)


def test_bad_limit_is_usage_error(job):
    result = invoke("run", job, "--limit", 0)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_empty_documents_note(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "Some words."}) + "\n" + json.dumps({"text": "  "}) + "\n")
    result = invoke("run", write_job(tmp_path, corpus, model=tiny_model_dir("bert"), device="cpu"))
    assert result.exit_code == 0, result.output
    assert "2 documents (1 empty)" in result.output
    assert "note: 1 empty documents" in result.stderr


def test_quiet_prints_nothing(job):
    result = invoke("run", "--quiet", job)
    assert result.exit_code == 0, result.output
    assert result.output == "", f"--quiet printed: {result.output!r}"


def test_rerun_skips_finished_shards(tmp_path, job):
    first = invoke("run", job, "--num-shards", 2)
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    files = {p: p.read_bytes() for p in parquet_files(out)}
    manifest = json.loads((out / "_manifest.json").read_text())

    second = invoke("run", job, "--num-shards", 2)
    assert second.exit_code == 0, second.output
    assert "0 shards run, 2 already committed" in second.output
    assert "5 documents" in second.output
    assert {p: p.read_bytes() for p in parquet_files(out)} == files
    assert json.loads((out / "_manifest.json").read_text())["shards"] == manifest["shards"]


def test_rerun_runs_only_missing_shards(tmp_path, job):
    """A shard without its commit record does not exist: the rerun removes its files and redoes it."""
    assert invoke("run", job, "--num-shards", 3).exit_code == 0
    out = tmp_path / "out"
    manifest_file = out / "_manifest.json"
    dropped = json.loads(manifest_file.read_text())["shards"]["1"]
    record = out / "_commits" / "shard-00001.json"
    old_files = [out / f["path"] for f in json.loads(record.read_text())["files"]]
    kept = {p: p.stat().st_mtime_ns for p in parquet_files(out) if p not in old_files}
    record.unlink()
    result = invoke("run", job, "--num-shards", 3)
    assert result.exit_code == 0, result.output
    assert "1 shard run, 2 already committed" in result.output
    assert json.loads(manifest_file.read_text())["shards"]["1"]["documents"] == dropped["documents"]
    assert not any(p.exists() for p in old_files)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_different_job_into_same_output_refused(tmp_path, job, corpus, tiny_model_dir):
    assert invoke("run", job).exit_code == 0
    other = write_job(tmp_path, corpus, model=tiny_model_dir("bert"), extra='id_column = "id"', device="cpu",
                      recipes='[[recipes]]\nname = "topk"\nk = 2\n')
    before = parquet_files(tmp_path / "out")
    line = error_line(invoke("run", other))
    assert "different job" in line and str(tmp_path / "out") in line
    assert "recipes" in line and "--new-run" in line
    assert parquet_files(tmp_path / "out") == before


def test_same_job_smaller_limit_is_refused_with_what_to_do(tmp_path, job):
    assert invoke("run", job).exit_code == 0
    line = error_line(invoke("run", job, "--limit", 2))
    assert "corpus.limit is 2" in line and "--limit 5" in line and "--new-run" in line


def test_output_dir_of_something_else_refused(tmp_path, job):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    line = error_line(invoke("run", job))
    assert "not empty" in line
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


# --- errors ----------------------------------------------------------------------------------

def _bad_job(case, tmp_path, corpus, model):
    """(job file, expected message part) for one kind of mistake; output is tmp_path/out."""
    folder = tmp_path / case
    folder.mkdir()

    def job(**kw):
        kw.setdefault("model", model)
        kw.setdefault("corpus", corpus)
        return write_job(folder, output=str(tmp_path / "out"), **kw)

    make = {
        "missing-file": lambda: (folder / "nope.toml", "job file not found"),
        "unknown-key": lambda: (job(num_shard=2), "unknown key 'run.num_shard'"),
        "wrong-type": lambda: (job(num_shards="4"), "run.num_shards"),
        "bad-device": lambda: (job(device="gpu"), "run.device"),
        "bad-recipe": lambda: (job(recipes='[[recipes]]\nname = "topkk"\n'), "unknown recipe 'topkk'"),
        "bad-param": lambda: (job(recipes='[[recipes]]\nname = "topk"\nk = 0\n'), "'k'"),
        "bad-column": lambda: (job(extra='text_column = "body"'), "column 'body'"),
        "missing-model": lambda: (job(model=tmp_path / "no-model"), "does not exist"),
        "missing-corpus": lambda: (job(corpus=tmp_path / "none.jsonl"), "not found"),
    }
    return make[case]()


CASES = ["missing-file", "unknown-key", "wrong-type", "bad-device", "bad-recipe", "bad-param",
         "bad-column", "missing-model", "missing-corpus"]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_without_traceback(tmp_path, corpus, tiny_model_dir, case):
    path, expected = _bad_job(case, tmp_path, corpus, tiny_model_dir("bert"))
    line = error_line(invoke("run", path))
    assert expected in line


def test_invalid_toml_one_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[corpus\npath = 1\n")
    line = error_line(invoke("run", path))
    assert "not valid TOML" in line


@pytest.mark.parametrize("case", ["unknown-key", "bad-recipe", "bad-column"])
def test_debug_raises_the_error(tmp_path, corpus, tiny_model_dir, case):
    path, expected = _bad_job(case, tmp_path, corpus, tiny_model_dir("bert"))
    result = invoke("run", "--debug", path)
    assert result.exit_code == 1
    assert isinstance(result.exception, AttnpipeError)
    assert expected in str(result.exception)
    assert result.exc_info[2] is not None


def test_debug_on_other_commands():
    result = invoke("schema", "--debug", "nosuchtable")
    assert isinstance(result.exception, AttnpipeError)


def _attnpipe(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "attnpipe.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_real_process_error_and_debug_traceback(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[corpus]\npath = "c.jsonl"\n[run]\nnum_shard = 2\n')
    plain = _attnpipe("run", path, cwd=tmp_path)
    assert plain.returncode == 1
    assert plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("Error: ") and "unknown key 'run.num_shard'" in plain.stderr
    assert "Traceback" not in plain.stderr

    debug = _attnpipe("run", "--debug", path, cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "attnpipe.errors.JobError" in debug.stderr and "unknown key 'run.num_shard'" in debug.stderr


# --- nothing half-written --------------------------------------------------------------------

def test_failure_before_work_leaves_no_files_and_rerun_works(tmp_path, corpus, tiny_model_dir):
    model = tiny_model_dir("bert")
    bad = write_job(tmp_path, corpus, model=model, extra='text_column = "body"', num_shards=2)
    error_line(invoke("run", bad))
    out = tmp_path / "out"
    assert parquet_files(out) == []
    assert not out.exists()
    good = write_job(tmp_path, corpus, model=model, num_shards=2)
    result = invoke("run", good)
    assert result.exit_code == 0, result.output
    assert parquet_files(out)


def test_window_too_small_for_stride_leaves_no_files(tmp_path, corpus, tiny_model_dir):
    """stride fits the TOML check only when max_length is unset; the model's window (128) is
    checked after loading, still before any shard is written."""
    job = tmp_path / "job.toml"
    job.write_text(f'[corpus]\npath = "{corpus}"\n[model]\nname = "{tiny_model_dir("bert")}"\n'
                   f'stride = 127\n[run]\noutput = "{tmp_path / "out"}"\nprogress = false\n')
    line = error_line(invoke("run", job))
    assert "model.stride" in line
    assert parquet_files(tmp_path / "out") == []


@pytest.mark.parametrize("case", ["bad-column", "missing-model", "missing-corpus"])
def test_failed_job_writes_no_parquet(tmp_path, corpus, tiny_model_dir, case):
    path, _ = _bad_job(case, tmp_path, corpus, tiny_model_dir("bert"))
    invoke("run", path)
    assert parquet_files(tmp_path / "out") == []


# --- the real packaged model -----------------------------------------------------------------

@pytest.mark.integration
def test_demo_job_on_builtin_minilm(tmp_path):
    out = tmp_path / "demo"
    result = invoke("run", REPO / "jobs" / "demo.toml", "--limit", 6, "--num-shards", 2,
                    "--output", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(invoke("inspect", out, "--json").output)
    assert summary["status"] == "complete" and summary["shards"] == "2/2 committed"
    assert set(summary["tables"]) == {"documents", "tokens", "words", "head_stats", "edges", "rollout", "maps"}
    assert summary["tables"]["documents"]["rows"] == 6
    assert summary["tables"]["head_stats"]["layers"] == list(range(6))
    assert summary["provenance"]["num_heads"] == 12
    assert summary["provenance"]["model"] == "all-MiniLM-L6-v2"
    assert summary["provenance"]["window_length"] == 128
    text = invoke("inspect", out).output
    assert "layers 0..5" in text and "all-MiniLM-L6-v2" in text
