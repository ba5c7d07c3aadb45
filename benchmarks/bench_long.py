"""Long contexts: peak memory and time of attnpipe (head_stats + topk) against the plain SDPA
forward, one window (batch 1) on a Llama-shaped model with grouped-query attention.

  sdpa      the model's plain forward with SDPA attention, nothing kept (the floor)
  attnpipe  the same forward through attnpipe's capture (run.attention auto: the fused Triton path
            on CUDA, the torch sdpa path elsewhere) with head_stats and topk k=8, rows on the host

Random weights (nothing downloaded), the embedded MiniLM tokenizer for pad/separator ids. On CUDA
each figure is measured in this process: peak = torch.cuda.max_memory_allocated() after a reset,
`extra` = peak minus what was allocated before the call (the weights). On a CPU each (method,
length) runs in a fresh child process and peak = its peak RSS (ru_maxrss), as a user would see it.
Time: median of --repeats calls after one warm-up call (at the same length on CUDA, where Triton
compiles per shape; at 256 tokens on a CPU, where a warm-up at full length would double the run).

Shapes: "small" is issue 17's (4 layers, hidden 256, 8 heads, 2 key/value heads, 64k positions),
"llama" is bench_extract's Llama GQA widths (hidden 2048, 32 heads, 8 key/value heads, head dim
64) with 4 layers. Defaults: llama at 4k/8k/16k/32k on CUDA; small at 4k/8k/16k/32k on a CPU (the
torch path takes a long window's queries a block at a time, reduce.query_blocks; the 32k figure
takes about 3 minutes on 2 cores; pass --lengths for fewer).

Usage: python benchmarks/bench_long.py [--device auto|cpu|cuda] [--lengths 4096,8192] [--shape small|llama]
                                       [--repeats N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = [{"name": "head_stats"}, {"name": "topk", "k": 8}]
SHAPES = {  # name -> (layers, hidden, heads, key/value heads)
    "small": (4, 256, 8, 2), "llama": (4, 2048, 32, 8)}
DEFAULTS = {  # device type -> (shape, lengths, repeats, dtype)
    "cuda": ("llama", [4096, 8192, 16384, 32768], 3, "bfloat16"),
    "cpu": ("small", [4096, 8192, 16384, 32768], 1, "float32")}
METHODS = ("sdpa", "attnpipe")
WARMUP_CPU = 256


def build(shape: str, dtype_name: str, device):
    """(LoadedModel, tokenizer): the model built from a config, weights seeded."""
    import torch
    from transformers import AutoModel, AutoTokenizer, LlamaConfig

    from attnpipe.hub import builtin_model_dir
    from attnpipe.model import LoadedModel

    layers, hidden, heads, kv_heads = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 15) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=65536)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    return LoadedModel(model, tok, f"llama-{shape}", device, dtype_name), tok


def window(tokens: int, vocab: int):
    import torch

    from attnpipe.windows import Window

    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(10, vocab - 10, (tokens,), generator=g).tolist()  # never zeros: see METHOD.md
    return [Window(0, 0, ids, [(0, 0)] * tokens, [False] * tokens)]


def caller(lm, method: str, windows):
    """A no-argument function running `method` once on `windows`, synchronised."""
    import torch

    from attnpipe import capture
    from attnpipe.recipes import validate_recipe
    from attnpipe.reduce import reduce_batch
    from attnpipe.windows import collate

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    if method == "sdpa":
        ids, mask = (t.to(lm.device) for t in collate(windows, lm.pad_id))

        def go():
            lm.model.set_attn_implementation("sdpa")
            try:
                lm.forward(ids, mask)
                sync()
            finally:
                lm.model.set_attn_implementation(capture.BACKEND)
        return go
    specs = [validate_recipe(r, "bench_long") for r in RECIPES]

    def go():
        outputs = reduce_batch(lm, windows, specs)
        sync()
        return outputs
    return go


def seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_cuda(lm, tok, method: str, tokens: int, repeats: int) -> dict:
    """One (method, length) in this process; a figure that runs out of memory says so."""
    import torch

    try:
        fn = caller(lm, method, window(tokens, len(tok)))
        fn()  # warm-up: Triton compiles for this shape
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = seconds(fn, repeats)
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"oom": True, "error": str(e).splitlines()[0]}
    return {"seconds": times, "median_s": statistics.median(times), "peak_gib": peak / 2**30,
            "extra_gib": (peak - base) / 2**30, "tok_s": tokens / statistics.median(times)}


def measure_cpu_child(args) -> None:
    """The child's side of a CPU figure: one (method, length), its result as one JSON line."""
    import torch

    method, tokens = args.one.split(":")
    tokens = int(tokens)
    if method == "attnpipe":  # as `attnpipe run` does on a CPU (pipeline/hostmem.py): without it, the
        from attnpipe.hostmem import keep_freed_memory  # blocks' varying sizes fragment the heap

        keep_freed_memory()  # (measured at 16k tokens: 1.48 GiB peak without, 1.01 GiB with)
    lm, tok = build(args.shape, args.dtype, torch.device("cpu"))
    caller(lm, method, window(WARMUP_CPU, len(tok)))()
    times = seconds(caller(lm, method, window(tokens, len(tok))), args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": times, "median_s": statistics.median(times), "peak_gib": peak / 2**30,
                      "tok_s": tokens / statistics.median(times)}))


def measure_cpu(args, method: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--device", "cpu", "--shape", args.shape, "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--one", f"{method}:{tokens}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:  # out of memory (killed) or an error: recorded, the other figures go on
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"failed": True, "returncode": done.returncode, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(row: dict) -> None:
    """attnpipe over sdpa, where both ran: memory (target <= 1.5) and time."""
    a, s = row["attnpipe"], row["sdpa"]
    if "peak_gib" in a and "peak_gib" in s:
        row["memory_ratio"] = a["peak_gib"] / s["peak_gib"]
        row["speed_ratio"] = s["median_s"] / a["median_s"]  # attnpipe speed / sdpa speed


def run(args, device) -> dict:
    import torch

    rows = []
    if device.type == "cuda":
        lm, tok = build(args.shape, args.dtype, device)
    for tokens in args.lengths:
        row = {"tokens": tokens}
        for method in METHODS:
            row[method] = (measure_cuda(lm, tok, method, tokens, args.repeats) if device.type == "cuda"
                           else measure_cpu(args, method, tokens))
        ratios(row)
        rows.append(row)
        print_row(row)
    layers, hidden, heads, kv_heads = SHAPES[args.shape]
    return {"device": device.type, "machine": machine(device), "torch": torch.__version__,
            "model": {"shape": args.shape, "layers": layers, "hidden": hidden, "heads": heads,
                      "kv_heads": kv_heads, "dtype": args.dtype},
            "recipes": RECIPES, "repeats": args.repeats, "rows": rows}


def machine(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, no GPU"


def cell(m: dict) -> str:
    if "median_s" not in m:
        return "OOM" if m.get("oom") else f"failed ({m.get('error', '')[:40]})"
    return f"{m['median_s']:8.3f} s [{m['peak_gib']:6.2f} GiB]"


def print_row(row: dict) -> None:
    extra = (f"  memory {row['memory_ratio']:.2f}x, speed {row['speed_ratio']:.2f}x of sdpa"
             if "memory_ratio" in row else "")
    print(f"{row['tokens']:>7} tokens  sdpa {cell(row['sdpa'])}  attnpipe {cell(row['attnpipe'])}{extra}",
          flush=True)


def lengths(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts of at least 16")
    return values


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--lengths", type=lengths, help="comma-separated token counts (default: per device)")
    ap.add_argument("--shape", choices=list(SHAPES), help="model widths (default: per device)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default: 3 on CUDA, 1 on a CPU)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: per device")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # METHOD:TOKENS, the CPU child's figure
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    sys.path.insert(0, str(REPO))
    import torch

    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_long: --device cuda, but torch sees no CUDA device")
    shape, default_lengths, repeats, dtype = DEFAULTS[kind]
    args.shape, args.lengths = args.shape or shape, args.lengths or default_lengths
    args.repeats, args.dtype = args.repeats or repeats, args.dtype or dtype
    if args.one:
        return measure_cpu_child(args)
    print(f"bench_long: {args.shape} Llama GQA, {args.dtype}, batch 1, head_stats + topk, on {kind}", flush=True)
    result = run(args, torch.device(kind))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
