"""Saliency recipes against the default recipes on all-MiniLM-L6-v2 (the demo corpus, the CPU).

Each configuration is one `attnpipe run` of a job over the first --docs documents of
jobs/data/demo_corpus.jsonl (windows of 128 tokens, float32 storage, one shard), in its own
process:

  default      the job's default recipes (head_stats, topk k=8 on the head mean, rollout k=8):
               capture at inference speed, the floor
  attn_grad    default + attn_grad, attn_grad_heads and grad_rollout (scalar pooled_norm): one
               forward and one backward pass per batch on top
  attn_ig      default + attn_ig and attn_ig_heads, steps 20: per layer 20 forward + backward
               passes and one more forward (Hao et al.); run on --ig-docs documents, it is slow
  attn_ig_mid5 default + attn_ig and attn_ig_heads, steps 5, rule midpoint (a quarter of the
               passes; on MiniLM a smaller completeness error than 20 right-sum steps)

Figures: wall seconds of the whole process (start-up, model load, writing, commit), tokens per
second over the window tokens, and peak RSS (ru_maxrss of the child). One run each.

Usage: python benchmarks/bench_saliency.py [--docs 100] [--ig-docs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "jobs" / "data" / "demo_corpus.jsonl"
DEFAULT = ""  # no [[recipes]]: the job's defaults
GRADIENTS = {
    "attn_grad": ['name = "attn_grad"\nk = 5', 'name = "attn_grad_heads"', 'name = "grad_rollout"\nk = 5'],
    "attn_ig": ['name = "attn_ig"\nk = 5\nsteps = 20', 'name = "attn_ig_heads"\nsteps = 20'],
    "attn_ig_mid5": ['name = "attn_ig"\nk = 5\nsteps = 5\nrule = "midpoint"',
                     'name = "attn_ig_heads"\nsteps = 5\nrule = "midpoint"'],
}


def job_text(out: Path, docs: int, recipes: list[str]) -> str:
    defaults = ['name = "head_stats"', 'name = "topk"\nk = 8\nper_head = false', 'name = "rollout"\nk = 8']
    body = "".join(f"[[recipes]]\n{r}\n\n" for r in (defaults + recipes if recipes else defaults))
    return (f'name = "bench-saliency"\n[corpus]\npath = "{CORPUS}"\nid_column = "id"\nlimit = {docs}\n'
            f'[model]\nname = "all-MiniLM-L6-v2"\nmax_length = 128\nstride = 32\n'
            f'[run]\noutput = "{out}"\nnum_shards = 1\ndevice = "cpu"\nweight_dtype = "float32"\nprogress = false\n\n'
            + body)


def run_one(name: str, docs: int, recipes: list[str], work: Path) -> dict:
    job = work / f"{name}.toml"
    job.write_text(job_text(work / name, docs, recipes))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "attnpipe.cli", "run", str(job), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{name}: attnpipe run failed:\n{child.stdout.read().decode()}")
    from attnpipe.read import open_dataset

    ds = open_dataset(work / name)
    tokens = int(ds.sql("SELECT count(*) AS n FROM tokens")["n"][0])
    return {"config": name, "docs": docs, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def relative_errors(out: Path) -> list[tuple[int, float, float]]:
    """(layer, median, max) of |completeness_error| / |F(A) - F(0_l)| over windows."""
    from attnpipe.read import open_dataset

    frame = open_dataset(out).sql(
        "SELECT layer, median(abs(completeness_error) / abs(scalar - scalar_baseline)) AS median, "
        "max(abs(completeness_error) / abs(scalar - scalar_baseline)) AS top FROM saliency_heads "
        "WHERE head = 0 GROUP BY layer ORDER BY layer")
    return [(int(r.layer), float(r.median), float(r.top)) for r in frame.itertuples()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--ig-docs", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-saliency-") as folder:
        work = Path(folder)
        rows = [run_one("default", args.docs, [], work), run_one("attn_grad", args.docs, GRADIENTS["attn_grad"], work),
                run_one("default-ig-docs", args.ig_docs, [], work),
                run_one("attn_ig", args.ig_docs, GRADIENTS["attn_ig"], work),
                run_one("attn_ig_mid5", args.ig_docs, GRADIENTS["attn_ig_mid5"], work)]
        completeness = {name: relative_errors(work / name) for name in ("attn_ig", "attn_ig_mid5")}
    print("| config | docs | tokens | seconds | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        cells = [r[k] for k in ("config", "docs", "tokens", "seconds", "tokens_per_s", "peak_rss_mb")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n| config | layer | median |error| / |F(A) - F(0_l)| | max |\n|---|---|---|---|")
    for name, errors in completeness.items():
        for layer, median, top in errors:
            print(f"| {name} | {layer} | {median:.4f} | {top:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "completeness": completeness}, indent=2) + "\n")


if __name__ == "__main__":
    main()
