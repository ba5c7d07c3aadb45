"""Generation on SmolLM2-135M-Instruct on the CPU: plain `generate` against attnpipe's generate
run, whole processes, the same prompts.

  generate  transformers' `generate` (SDPA attention, greedy, KV cache, batches of 8 left-padded
            prompts sorted by length), nothing kept: the floor
  attnpipe  `attnpipe run` of a [generate] job over the same prompts: the default recipes (head_stats,
            topk k=8 on the head mean, rollout on the prompt), per-step edges and head statistics,
            the generations and grounding tables, committed

Both render the prompts the same way (jobs/grounding.toml's system message, template and the
tokenizer's chat template) and generate exactly --new tokens per prompt (min_new_tokens), so the
token counts match. Figures: generated tokens per second of the whole process (start-up, model
load, writing and commit included) and of generation alone for the plain script, and peak RSS
(ru_maxrss of each child). Runs alternate between the two, --repeats times; medians are printed.

--long: one prompt with a --context-token context and --new 256 tokens, head_stats + topk only
(rollout is a whole-map product), peak RSS and time of each.

Usage: python benchmarks/bench_generate.py [--docs 48] [--new 32] [--repeats 3] [--long] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "jobs" / "data" / "grounding.jsonl"
SYSTEM = ("Answer in one short sentence, using only the context. If the context does not say, answer: "
          "The context does not say.")
TEMPLATE = "Context: {context}\n\nQuestion: {text}"

PLAIN = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from attnpipe import embedded
from attnpipe.generate.prompts import fill_template, render
corpus, new, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folder = str(embedded.model_dir())
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
rows = [json.loads(line) for line in open(corpus)]
texts = [render(tok, *fill_template(TEMPLATE, r["question"], r["context"]), SYSTEM, True, r["id"])[0] for r in rows]
enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
t1 = time.perf_counter()
generated = 0
with torch.inference_mode():
    for s in range(0, len(order), batch):
        chosen = [enc[i] for i in order[s:s + batch]]
        width = max(map(len, chosen))
        ids = torch.full((len(chosen), width), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(chosen):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tok.pad_token_id or 0)
        generated += (out.shape[1] - width) * len(chosen)
t2 = time.perf_counter()
print(json.dumps({"generated": generated, "load_s": t1 - t0, "generate_s": t2 - t1}))
'''.replace("TEMPLATE", repr(TEMPLATE)).replace("SYSTEM", repr(SYSTEM))


def corpus(folder: Path, docs: int, context_tokens: int | None = None) -> Path:
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines()]
    if context_tokens:  # one long prompt: the contexts repeated to about that many tokens (~1.3 tokens a word)
        text = " ".join(r["context"] for r in rows[::3])
        words = text.split()
        context = " ".join(words[i % len(words)] for i in range(int(context_tokens / 1.3)))
        rows = [{"id": "long", "question": rows[0]["question"], "context": context}]
    else:
        rows = [dict(rows[i % len(rows)], id=f"{rows[i % len(rows)]['id']}-{i // len(rows)}") for i in range(docs)]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(folder: Path, data: Path, new: int, batch: int, recipes: str = "") -> Path:
    path = folder / "job.toml"
    path.write_text(f'''name = "bench"
[corpus]
path = "{data}"
text_column = "question"
context_column = "context"
id_column = "id"
[model]
name = "SmolLM2-135M-Instruct"
[run]
output = "{folder / 'out'}"
progress = false
device = "cpu"
[generate]
system = {json.dumps(SYSTEM)}
template = {json.dumps(TEMPLATE)}
max_new_tokens = {new}
min_new_tokens = {new}
batch_size = {batch}
{recipes}''')
    return path


def child(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{args[:3]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def generated_tokens(out: Path) -> int:
    from attnpipe import open_dataset

    with open_dataset(out) as ds:
        return int(ds.sql("select count(*) as n from generations").n[0])


def measure(folder: Path, data: Path, new: int, batch: int, recipes: str = "") -> dict:
    plain_wall, plain_rss, text = child([sys.executable, "-c", PLAIN, str(data), str(new), str(batch)])
    plain = json.loads(text.strip().splitlines()[-1])
    job_file = job(folder, data, new, batch, recipes)
    subprocess.run(["rm", "-rf", str(folder / "out")], check=True)
    ours_wall, ours_rss, _ = child([sys.executable, "-m", "attnpipe.cli", "run", str(job_file), "--quiet"])
    tokens = generated_tokens(folder / "out")
    return {"plain": {"wall_s": plain_wall, "peak_mib": plain_rss, "tokens": plain["generated"],
                      "load_s": plain["load_s"], "generate_s": plain["generate_s"]},
            "attnpipe": {"wall_s": ours_wall, "peak_mib": ours_rss, "tokens": tokens}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="one 4k-token context and 256 new tokens")
    ap.add_argument("--context-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from attnpipe import embedded

    embedded.model_dir()  # converted once, before anything is timed
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        folder = Path(tmp)
        if args.long:
            new = 256 if args.new == 32 else args.new
            data = corpus(folder, 1, args.context_tokens)
            recipes = '[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 8\n'
            runs = [measure(folder, data, new, 1, recipes) for _ in range(args.repeats)]
        else:
            data = corpus(folder, args.docs)
            runs = [measure(folder, data, args.new, args.batch) for _ in range(args.repeats)]
    med = lambda side, key: statistics.median(r[side][key] for r in runs)  # noqa: E731
    tokens = runs[0]["plain"]["tokens"]
    assert all(r["attnpipe"]["tokens"] == tokens for r in runs), "token counts differ"
    plain_rate, ours_rate = tokens / med("plain", "wall_s"), tokens / med("attnpipe", "wall_s")
    result = {"machine": f"{os.cpu_count()} CPUs", "long": args.long, "prompts": 1 if args.long else args.docs,
              "new_tokens": new if args.long else args.new, "generated": tokens, "runs": runs,
              "plain_tokens_per_s": plain_rate, "attnpipe_tokens_per_s": ours_rate, "ratio": ours_rate / plain_rate,
              "plain_generate_only_tokens_per_s": tokens / med("plain", "generate_s"),
              "peak_mib": {"plain": med("plain", "peak_mib"), "attnpipe": med("attnpipe", "peak_mib")}}
    print(f"{result['prompts']} prompts x {result['new_tokens']} new tokens = {tokens} generated, "
          f"median of {args.repeats} whole processes each")
    print(f"  generate (plain, SDPA)   {med('plain', 'wall_s'):7.1f} s  {plain_rate:6.1f} tokens/s  "
          f"peak {med('plain', 'peak_mib'):6.0f} MiB   (model load {med('plain', 'load_s'):.1f} s; "
          f"generation alone {result['plain_generate_only_tokens_per_s']:.1f} tokens/s)")
    print(f"  attnpipe run             {med('attnpipe', 'wall_s'):7.1f} s  {ours_rate:6.1f} tokens/s  "
          f"peak {med('attnpipe', 'peak_mib'):6.0f} MiB")
    print(f"  ratio (attnpipe / plain) {result['ratio']:.2f}x tokens/s; peak memory "
          f"{result['peak_mib']['attnpipe'] / result['peak_mib']['plain']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
