"""Where the CPU path's time goes: the plain SDPA script and `attnpipe run`, phase by phase.

The same workload as `bench_extract.py --cpu` (the demo corpus x4, MiniLM float32, the default
recipes), each process timed from the inside. Plain script: start-up (imports, corpus, tokenizer,
model, tokenization), the batch loop, and the SDPA calls inside it. attnpipe: start-up (imports,
job, corpus, model), the model's forward passes, the attention with every recipe inside them (the
compiled kernel's pass, or without it the probabilities and the layers' outputs P V; each
recipe), tokenizing the chunks, the last seal and
commit, and the CPU seconds of the writer and seal threads, which run beside the model. Processes
alternate, `--repeats` times each; medians are printed, and every run with `--json`.

attnpipe leaves through os._exit once done (pipeline/cli.py: leave), the plain script through the
interpreter's teardown: the report shows both processes' time outside their own work.

Usage: python benchmarks/profile_cpu.py [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_extract import PLAIN, cpu_job, machine  # noqa: E402


def _plain_child(corpus: str) -> dict:
    """Run the plain SDPA script here, timing its phases."""
    t0 = time.perf_counter()
    import torch.nn.functional as F

    import attnpipe.windows as windows

    times = {"sdpa_s": 0.0}
    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(*args, **kwargs):
        started = time.perf_counter()
        try:
            return sdpa(*args, **kwargs)
        finally:
            times["sdpa_s"] += time.perf_counter() - started

    F.scaled_dot_product_attention = timed_sdpa  # transformers looks it up at each call
    batches = windows.make_batches

    def first_batches(*args, **kwargs):  # called once, right before the loop
        times["startup_s"] = time.perf_counter() - t0
        return batches(*args, **kwargs)

    windows.make_batches = first_batches
    sys.argv = ["plain", corpus, "sdpa"]
    exec(compile(PLAIN, "plain", "exec"), {"__name__": "plain"})
    times["total_s"] = time.perf_counter() - t0
    times["loop_s"] = times["total_s"] - times["startup_s"]
    return times


def _attnpipe_child(job: str, out: str) -> dict:
    """Run `attnpipe run` here, timing its phases."""
    t0 = time.perf_counter()
    import functools
    import threading
    from concurrent.futures import thread as futures_thread

    import attnpipe.capture as capture
    import attnpipe.cli as cli
    import attnpipe.model as model
    import attnpipe.recipes.compiled as compiled
    import attnpipe.reduce as reduce
    import attnpipe.runtime as runtime
    import attnpipe.shard as shard
    import attnpipe.store.writer as writer
    from attnpipe.recipes import RECIPES

    times: dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        times[key] = times.get(key, 0.0) + seconds

    def wrap(owner, name: str, key: str, first: str | None = None) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            if first and first not in times:
                times[first] = started - t0
            try:
                return fn(*args, **kwargs)
            finally:
                add(key, time.perf_counter() - started)

        setattr(owner, name, staticmethod(timed) if isinstance(owner.__dict__.get(name), staticmethod) else timed)

    wrap(runtime.Runtime, "build", "model_load_s", first="startup_s")
    wrap(model.LoadedModel, "forward", "forward_s")
    wrap(reduce, "reduce_layer", "attention_and_recipes_s")
    wrap(capture.LayerInputs, "probs_entropy_rows", "  probabilities and entropy (with the two below)_s")
    wrap(capture.LayerInputs, "probs_rows", "  probabilities and entropy (with the two below)_s")
    wrap(capture.LayerInputs, "scores_rows", "    scores q k^T_s")
    wrap(capture.LayerInputs, "_emit", "    the layer's output P V_s")
    # with the compiled CPU kernel (kernels/cpu.py), one pass instead of the three above
    wrap(capture.LayerInputs, "compiled_rows", "    compiled kernel: output, statistics, head mean_s")
    wrap(shard, "_tokenize_chunk", "tokenize_chunks_s")
    wrap(writer.ShardWriter, "finalize", "finalize_s")
    for name in ("head_stats", "topk", "rollout"):  # head_stats forms the probabilities (entropy)
        recipe = RECIPES[name]
        wrap_target = recipe.fn

        label = f"  recipe {name}" + (" (with the probabilities)" if name == "head_stats" else "")

        def timed(*args, _fn=wrap_target, _key=f"{label}_s", **kwargs):
            started = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                add(_key, time.perf_counter() - started)

        recipe.__dict__["fn"] = timed
        if name in compiled.COMPILED:  # the kernel's own head_stats, with the kernel's pass
            compiled.COMPILED[name] = functools.partial(timed, _fn=compiled.COMPILED[name])
    background = shard.BackgroundWriter._run

    def writer_thread(self):
        try:
            background(self)
        finally:
            add("writer_thread_cpu_s", time.thread_time())

    shard.BackgroundWriter._run = writer_thread
    work = futures_thread._WorkItem.run

    def work_item(self):
        started = time.thread_time()
        try:
            return work(self)
        finally:
            if threading.current_thread().name.startswith("attnpipe-seal"):
                add("seal_threads_cpu_s", time.thread_time() - started)

    futures_thread._WorkItem.run = work_item
    try:
        cli.cli(["run", job, "-q", "-o", out], prog_name="attnpipe", standalone_mode=False)
    finally:
        times["total_s"] = time.perf_counter() - t0
    times["model_without_attention_s"] = times["forward_s"] - times["attention_and_recipes_s"]
    return times


def run(repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"plain_sdpa": [], "attnpipe": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, job, env = cpu_job(tmp)
        for r in range(repeats):
            for name, args in (("plain_sdpa", ["plain", str(corpus)]),
                               ("attnpipe", ["attnpipe", str(job), str(tmp / f"out{r}")])):
                started = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                                      env=env, cwd=REPO)
                if done.returncode:
                    sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
                times = json.loads(done.stdout.strip().splitlines()[-1])
                times["process_s"] = time.perf_counter() - started
                runs[name].append(times)
    return {"machine": machine("cpu"), "runs": runs}


def medians(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def report(result: dict) -> None:
    plain, ours = medians(result["runs"]["plain_sdpa"]), medians(result["runs"]["attnpipe"])
    n = len(result["runs"]["attnpipe"])
    print(f"Where the CPU path's time goes ({result['machine']}), median of {n}, seconds")
    print(f"  plain SDPA script: process {plain['process_s']:.2f} (start-up {plain['startup_s']:.2f}, "
          f"batch loop {plain['loop_s']:.2f}, of which SDPA {plain['sdpa_s']:.2f}; interpreter start and "
          f"teardown {plain['process_s'] - plain['total_s']:.2f})")
    print(f"  attnpipe run:      process {ours['process_s']:.2f} (interpreter start and exit "
          f"{ours['process_s'] - ours['total_s']:.2f})")
    order = ["startup_s", "model_load_s", "tokenize_chunks_s", "forward_s", "model_without_attention_s",
             "attention_and_recipes_s"] + sorted(k for k in ours if k.startswith("  ")) + [
             "finalize_s", "writer_thread_cpu_s", "seal_threads_cpu_s", "total_s"]
    for key in order:
        if key in ours:
            print(f"    {key[:-2]:52s} {ours[key]:7.2f}")
    print(f"  ratio of process medians (plain SDPA / attnpipe): {plain['process_s'] / ours['process_s']:.2f}x "
          f"(target >= 0.9x)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        times = _plain_child(*args) if kind == "plain" else _attnpipe_child(*args)
        sys.stdout.flush()
        print(json.dumps(times))
        if kind == "attnpipe":  # it ends as the command does (pipeline/cli.py: leave)
            from attnpipe.cli import leave

            leave(0)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every run's phases here")
    args = ap.parse_args()
    result = run(args.repeats)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
