"""Extraction speed against plain inference: the numbers issue 6 is judged by.

On a GPU (CUDA): for BERT-base 32 x 512, GPT-2 16 x 1024 and a Llama GQA shape 4 x 2048 (random
weights, nothing downloaded), in one process, tokens/s and peak GPU memory of
  sdpa       plain forward with SDPA attention, nothing kept (the floor)
  eager      plain forward with eager attention
  naive      eager + output_attentions=True, every layer's map copied to the host
  eager+red  eager attention, the torch recipes on the device (the 0.1 design)
  attnpipe   attnpipe's capture (run.attention auto) + recipes + rows to the Parquet writer,
             for the default recipe set and again with per-head topk k=8 added
Ratios are to sdpa. Written as a table and as JSON.

On a CPU (no CUDA, or --cpu): the whole process, as a user runs it: `attnpipe run` with the
default recipe set over the demo corpus repeated four times (MiniLM, float32), against a plain
script that reads the same corpus with datasets, tokenizes the same windows, batches them the
same way and runs the model with eager attention, keeping nothing.

Usage: python benchmarks/bench_extract.py [--cpu] [--json FILE] [--repeats 3] [--quick [--tiny]] [--models M,...]
  --quick: tiny shapes (smoke test of the GPU code path on any device); --tiny: 2-layer models too.
  --models: only these rows of the GPU table (benchmarks/gpu_check.py runs one per step, so a row
            that overruns its time costs only itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT = [{"name": "head_stats"}, {"name": "topk", "k": 8, "per_head": False}, {"name": "rollout", "k": 8}]
PER_HEAD = DEFAULT + [{"name": "topk", "k": 8, "per_head": True}]
SHAPES = {  # name -> (config factory, batch, tokens)
    "bert-base": ("bert", 32, 512), "gpt2": ("gpt2", 16, 1024), "llama-gqa": ("llama", 4, 2048)}
QUICK = {"bert-base": ("bert", 2, 64), "gpt2": ("gpt2", 2, 64), "llama-gqa": ("llama", 1, 128)}


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {cpu}"
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


# ---------------------------------------------------------------- CPU: whole processes

PLAIN = '''
import sys, torch, datasets
from transformers import AutoModel, AutoTokenizer
from attnpipe.hub import builtin_model_dir
from attnpipe.windows import tokenize, make_batches, collate
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train")
tok = AutoTokenizer.from_pretrained(builtin_model_dir())
model = AutoModel.from_pretrained(builtin_model_dir(), attn_implementation=sys.argv[2]).eval()
windows = tokenize(tok, [t or "" for t in ds["text"]], 128, 32)
with torch.inference_mode():
    for batch in make_batches(windows, 8192):
        ids, mask = collate([windows[i] for i in batch], tok.pad_token_id)
        model(input_ids=ids, attention_mask=mask)
print(sum(len(w) for w in windows))
'''


def cpu_corpus(folder: Path) -> Path:
    rows = [json.loads(line) for line in (REPO / "jobs/data/demo_corpus.jsonl").read_text().splitlines()]
    path = folder / "corpus4.jsonl"
    path.write_text("".join(json.dumps({"id": f"{r['id']}-{k}", "text": r["text"]}) + "\n"
                            for k in range(4) for r in rows))
    return path


def cpu_job(folder: Path) -> tuple[Path, Path, dict]:
    """(corpus, job file, environment) of the CPU whole-process comparison, written in `folder`."""
    corpus = cpu_corpus(folder)
    job = folder / "job.toml"
    job.write_text(f'name = "bench"\n[corpus]\npath = "{corpus}"\nid_column = "id"\n[model]\nmax_length = 128\n'
                   f'stride = 32\n[run]\ndevice = "cpu"\nnum_shards = 1\nprogress = false\n')
    return corpus, job, {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def wall(cmd: list[str], env=None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def run_cpu(repeats: int) -> dict:
    """Whole processes, interleaved, `repeats` times each. Besides the two the target compares,
    two for context: the plain script with attnpipe's malloc setting (pipeline.hostmem), and
    attnpipe without it, so the table says how much of the ratio that setting is."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, job, env = cpu_job(tmp)
        env.pop("ATTNPIPE_KEEP_FREED_MEMORY", None)
        keep = "from attnpipe.hostmem import keep_freed_memory\nkeep_freed_memory()\n"
        variants = {  # name -> (command, environment)
            "plain": (lambda r: [sys.executable, "-c", PLAIN, str(corpus), "eager"], env),
            "plain_sdpa": (lambda r: [sys.executable, "-c", PLAIN, str(corpus), "sdpa"], env),
            "attnpipe": (lambda r: [sys.executable, "-m", "attnpipe.cli", "run", str(job), "-q", "-o",
                                    str(tmp / f"out{r}")], env),
            "plain_keep_freed": (lambda r: [sys.executable, "-c", keep + PLAIN, str(corpus), "eager"], env),
            "attnpipe_system_malloc": (lambda r: [sys.executable, "-m", "attnpipe.cli", "run", str(job), "-q",
                                                  "-o", str(tmp / f"sys{r}")],
                                       {**env, "ATTNPIPE_KEEP_FREED_MEMORY": "0"}),
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        tokens = None
        for r in range(repeats):
            for name, (command, environment) in variants.items():
                took, out = wall(command(r), environment)
                seconds[name].append(took)
                if name == "plain":
                    tokens = int(out.strip().splitlines()[-1])
        median = {name: statistics.median(s) for name, s in seconds.items()}
        return {"machine": machine("cpu"), "tokens": tokens, "seconds": seconds, "median_s": median,
                "speed_ratio": median["plain"] / median["attnpipe"],
                "sdpa_ratio": median["plain_sdpa"] / median["attnpipe"]}


def print_cpu(r: dict) -> None:
    m, n = r["median_s"], r["tokens"]
    print(f"CPU, whole process ({r['machine']}), {n:,} tokens, MiniLM float32, default recipes, "
          f"median of {len(r['seconds']['plain'])}")
    rows = [("plain eager script", "plain"), ("plain SDPA script", "plain_sdpa"), ("attnpipe run", "attnpipe"),
            ("  for context: plain script, malloc keeping freed blocks", "plain_keep_freed"),
            ("  for context: attnpipe, system malloc", "attnpipe_system_malloc")]
    for label, key in rows:
        print(f"  {label:58s} {m[key]:6.1f} s  {n / m[key]:8,.0f} tok/s  ({m['plain'] / m[key]:.2f}x plain)")
    print(f"  attnpipe speed / plain eager script speed: {r['speed_ratio']:.2f}x (target >= 0.8x)")
    print(f"  attnpipe speed / plain SDPA script speed: {r['sdpa_ratio']:.2f}x (target >= 0.9x)")


# ---------------------------------------------------------------- GPU: one process

TINY = {  # --tiny: 2-layer widths, for a smoke run of the code path in seconds (gpu_check --cpu-dry)
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)}


def build_model(kind: str, dtype, tiny: bool = False):
    import torch
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    llama = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=4096, vocab_size=32000)
    small = TINY[kind] if tiny else {}
    config = {"bert": lambda: BertConfig(max_position_embeddings=2048, **small),
              "gpt2": lambda: GPT2Config(n_positions=2048, **small),
              "llama": lambda: LlamaConfig(**{**llama, **small})}[kind]()
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def gpu_batch(batch: int, tokens: int, vocab: int, device):
    import torch

    from attnpipe.windows import Window

    g = torch.Generator().manual_seed(0)
    windows = []
    for b in range(batch):  # one full row, the rest ragged: padding in every batch
        n = tokens if b == 0 else int(torch.randint(tokens * 3 // 4, tokens + 1, (1,), generator=g))
        ids = torch.randint(10, vocab - 10, (n,), generator=g).tolist()
        windows.append(Window(b, 0, ids, [(0, 0)] * n, [False] * n))
    return windows


def timed(fn, sync, repeats: int) -> tuple[float, float]:
    import torch

    fn()
    sync()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return statistics.median(times), peak


def run_gpu(shapes: dict, device_name: str, repeats: int, dtype_name: str, tiny: bool = False) -> list[dict]:
    import torch

    from attnpipe.model import LoadedModel
    from attnpipe.recipes import RECIPES, LayerAttention, recipe_params, validate_recipe
    from attnpipe.reduce import apply_recipes, batch_masks, reduce_batch
    from attnpipe.store.writer import ShardWriter
    from attnpipe.windows import collate
    from attnpipe.hub import builtin_model_dir
    from transformers import AutoTokenizer

    device = torch.device(device_name)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    results = []
    for name, (kind, batch, tokens) in shapes.items():
        model = build_model(kind, dtype, tiny).to(device)
        windows = gpu_batch(batch, tokens, min(model.config.vocab_size, len(tok)), device)  # ids the tokenizer knows
        ids, mask = (t.to(device) for t in collate(windows, 0))
        n_tokens = int(mask.sum())
        row = {"model": name, "batch": batch, "tokens": tokens, "dtype": dtype_name} | ({"tiny": True} if tiny else {})

        def forward(impl, **kw):
            model.set_attn_implementation(impl)
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask, **kw)

        def naive():
            out = forward("eager", output_attentions=True)
            return [a.float().cpu() for a in out.attentions]

        lm = LoadedModel(model, tok, name, device, dtype_name)  # run.attention auto, as a job gets it
        recipes = [validate_recipe(r, "bench") for r in DEFAULT]
        masks = batch_masks(lm, windows, ids)

        def eager_reduce():
            out = forward("eager", output_attentions=True)
            carry = {}
            for layer, probs in enumerate(out.attentions):
                apply_recipes(LayerAttention(probs, layer, masks), recipes, carry)

        def attnpipe(recipe_set):
            specs = [validate_recipe(r, "bench") for r in recipe_set]
            model.set_attn_implementation("attnpipe")

            def go():
                with tempfile.TemporaryDirectory() as tmp, ShardWriter(Path(tmp), 0, "bench0000", {}) as w:
                    from attnpipe.shard import output_columns
                    import numpy as np
                    w.doc_ids = [f"d{i:06d}" for i in range(len(windows))]
                    w.recipes = {i: (r["name"], recipe_params(r)) for i, r in enumerate(specs)}
                    doc_index = np.arange(len(windows), dtype=np.int32)
                    wids = np.zeros(len(windows), dtype=np.int32)
                    for o in reduce_batch(lm, windows, specs):
                        w.write_batch(RECIPES[specs[o.recipe]["name"]].table, output_columns(o, doc_index, wids),
                                      layer=o.layer, recipe=o.recipe)
                    w.finalize()
            return go

        methods = {"sdpa": lambda: forward("sdpa"), "eager": lambda: forward("eager"), "naive": naive,
                   "eager+red": eager_reduce, "attnpipe": attnpipe(DEFAULT), "attnpipe+perhead": attnpipe(PER_HEAD)}
        for method, fn in methods.items():
            try:
                seconds, peak = timed(fn, sync, repeats)
                row[method] = {"tok_s": n_tokens / seconds, "peak_gib": peak}
            except torch.cuda.OutOfMemoryError:
                row[method] = {"tok_s": float("nan"), "peak_gib": float("nan"), "oom": True}
                torch.cuda.empty_cache()
        results.append(row)
        del model, lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def print_gpu(rows: list[dict], where: str) -> None:
    methods = ["sdpa", "eager", "naive", "eager+red", "attnpipe", "attnpipe+perhead"]
    print(f"Extraction, tokens/s (ratio to sdpa) [peak GiB] on {where}")
    print(f"{'model':<22}" + "".join(f"{m:>24}" for m in methods))
    for r in rows:
        base = r["sdpa"]["tok_s"]
        cells = [f"{r[m]['tok_s']:>9,.0f} ({r[m]['tok_s'] / base:4.2f}x) [{r[m]['peak_gib']:4.1f}]" for m in methods]
        label = f"{r['model']} {r['batch']}x{r['tokens']}"
        print(f"{label:<22}"
              + "".join(f"{c:>24}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU whole-process comparison even with CUDA")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="2-layer models of the same kinds (smoke test, with --quick)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(SHAPES),
                    help=f"comma-separated rows of the GPU table (default: all of {','.join(SHAPES)})")
    args = ap.parse_args()
    unknown = sorted(set(args.models) - set(SHAPES))
    if unknown:
        ap.error(f"--models: unknown {','.join(unknown)}; valid: {','.join(SHAPES)}")
    shapes, quick = ({k: v for k, v in table.items() if k in args.models} for table in (SHAPES, QUICK))
    import torch

    if args.cpu or not torch.cuda.is_available():
        if args.quick:
            rows = run_gpu(quick, "cpu", args.repeats, "float32", args.tiny)
            print_gpu(rows, machine("cpu") + " (quick smoke run of the GPU code path)")
            result = {"quick": rows}
        else:
            result = {"cpu": run_cpu(args.repeats)}
            print_cpu(result["cpu"])
    else:
        rows = run_gpu(quick if args.quick else shapes, "cuda", args.repeats, args.dtype, args.tiny)
        print_gpu(rows, machine("cuda"))
        result = {"gpu": rows, "machine": machine("cuda")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
