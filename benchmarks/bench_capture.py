"""Capture + reduce throughput: attnpipe vs the usual `output_attentions=True` script.

Runs, in one process and on the same batches:
  sdpa      plain SDPA inference, no attention kept (the floor)
  baseline  HF eager with output_attentions=True, every layer's full map copied to the host,
            then the same recipes run there (what scripts built on output_attentions do)
  attnpipe  our capture: each layer's map reduced on the device, only the results copied

Prints median seconds per batch, tokens/s, and ratios. Usage:
  python benchmarks/bench_capture.py [--model minilm|bert-base] [--batch 16] [--seq 128]
                                     [--device auto] [--dtype float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from attnpipe.model import DTYPES, LoadedModel, builtin_model_dir, pick_device
from attnpipe.recipes import LayerAttention, validate_recipe
from attnpipe.reduce import apply_recipes, batch_masks, reduce_batch
from attnpipe.windows import Window, collate

RECIPE_SET = [{"name": "head_stats"}, {"name": "topk", "k": 8}, {"name": "topk", "k": 8, "per_head": False},
              {"name": "rollout", "k": 8}]


def build(model: str, dtype: torch.dtype):
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    if model == "minilm":
        net = AutoModel.from_pretrained(builtin_model_dir(), dtype=dtype, attn_implementation="eager")
    else:  # BERT-base shape, random weights (no download): timing does not depend on the values
        torch.manual_seed(0)
        net = AutoModel.from_config(BertConfig(), attn_implementation="eager").to(dtype)
    return net.eval(), tok


def windows_for(tok, batch: int, seq: int) -> list[Window]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(batch):  # ragged lengths: padding in every batch, as in real corpora
        n = seq if b == 0 else int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        ids = [tok.cls_token_id] + torch.randint(1000, 29000, (n - 2,), generator=g).tolist() + [tok.sep_token_id]
        out.append(Window(b, 0, ids, [(0, 0)] * n, [True] + [False] * (n - 2) + [True]))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = pick_device(args.device)
    net, tok = build(args.model, DTYPES[args.dtype])
    recipes = [validate_recipe(r, "bench") for r in RECIPE_SET]
    windows = windows_for(tok, args.batch, args.seq)
    lm = LoadedModel(copy.deepcopy(net), tok, args.model, device, args.dtype)
    sdpa = copy.deepcopy(net).to(device)
    sdpa.set_attn_implementation("sdpa")
    eager = net.to(device)
    ids, mask = (t.to(device) for t in collate(windows, lm.pad_id))

    @torch.inference_mode()
    def run_sdpa():
        sdpa(input_ids=ids, attention_mask=mask)

    @torch.inference_mode()
    def run_baseline():
        maps = [a.cpu() for a in eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions]
        masks = batch_masks(lm, windows, ids.cpu())
        carry = {}
        for layer, probs in enumerate(maps):
            apply_recipes(LayerAttention(probs, layer, masks), recipes, carry)

    def run_ours():
        reduce_batch(lm, windows, recipes)

    tokens = int(mask.sum())
    results = {}
    for name, fn in [("sdpa", run_sdpa), ("baseline", run_baseline), ("attnpipe", run_ours)]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        results[name] = seconds
        print(f"{name:<9} {seconds * 1000:9.1f} ms/batch {tokens / seconds:12,.0f} tok/s  peak GPU {peak:8.0f} MiB")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.model}, batch {args.batch} x seq {args.seq} ({tokens} real tokens), {args.dtype}, {gpu}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"baseline / attnpipe = {results['baseline'] / results['attnpipe']:.2f}x  (higher: attnpipe faster)")
    print(f"attnpipe / sdpa     = {results['attnpipe'] / results['sdpa']:.2f}x  (cost of capture over plain inference)")
    print(f"baseline / sdpa     = {results['baseline'] / results['sdpa']:.2f}x")


if __name__ == "__main__":
    main()
