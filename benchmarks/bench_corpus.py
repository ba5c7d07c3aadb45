"""Corpus opening: peak RSS and time of `open_corpus` on a JSON Lines file of N MB, cold (no
cache) and warm (the cache of a previous open present), against `datasets.load_dataset("json")`
(which also writes an Arrow cache and memory-maps it) as the baseline.

Each open runs in a fresh child process; peak RSS is its ru_maxrss (which counts the pages of
memory-mapped files it touched as well as its own memory), "growth" the peak less the RSS after
the imports. Cold: an empty $ATTNPIPE_CACHE (or HF_DATASETS_CACHE); warm: the cache that the
previous cold open left. Each figure is the median of --repeat runs (the machine is shared).
`--corpus` adds the `Corpus` built from the opened table (ids and text hashes of every row: it
reads every text, so the mapped pages it touches count in its RSS). `--before REV` measures the
attnpipe of a git revision too (e.g. the whole-corpus-in-memory reader). Usage:
  python benchmarks/bench_corpus.py [--mb 50 500] [--repeat 3] [--corpus] [--before REV] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("attention head layer token query key value model corpus river cat rain sun mat bend window "
         "shard batch arrow parquet memory disk cache worker process file line paragraph record").split()

CHILD = r"""
import json, os, resource, sys, time
src, impl, data, with_corpus = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if src:  # an older attnpipe, imported from an exported tree
    import importlib.util
    spec = importlib.util.spec_from_file_location("attnpipe", os.path.join(src, "__init__.py"),
                                                  submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec); sys.modules["attnpipe"] = module; spec.loader.exec_module(module)
from pathlib import Path
import datasets
from attnpipe.corpus import Corpus, open_corpus
from attnpipe.job import CorpusSpec

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

base = rss()
start = time.perf_counter()
spec = CorpusSpec(path=data, id_column="id")
if impl == "datasets":
    ds = datasets.load_dataset("json", data_files=[data], split="train")
else:
    ds = open_corpus(spec, Path("."))
out = {"seconds": time.perf_counter() - start, "peak": rss(), "base": base, "rows": len(ds), **status()}
if with_corpus and impl != "datasets":
    start = time.perf_counter()
    corpus = Corpus(ds, spec)
    after = status()
    out.update(corpus_seconds=time.perf_counter() - start, corpus_peak=rss(), corpus_anon=after["RssAnon"],
               corpus_mapped=after["RssFile"])
print(json.dumps(out))
"""


def make_jsonl(path: Path, mb: int) -> int:
    """A JSON Lines file of about `mb` MB, ~500-byte records {id, text, topic}; its row count."""
    rng = random.Random(0)
    target, size, rows = mb * 10**6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            lines = []
            for _ in range(1_000):
                text = " ".join(rng.choices(WORDS, k=rng.randint(40, 100)))
                lines.append(json.dumps({"id": f"d{rows}", "text": text, "topic": rng.choice(WORDS)}) + "\n")
                rows += 1
            chunk = "".join(lines)
            f.write(chunk)
            size += len(chunk.encode())
    # The reader caches only files that have not changed for a moment (coarse file clocks).
    time.sleep(2.5)
    return rows


def run_child(src: str, impl: str, data: Path, env: dict, with_corpus: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, src, impl, str(data), "1" if with_corpus else "0"],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed ({impl}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(src: str, impl: str, data: Path, work: Path, repeat: int, with_corpus: bool) -> dict:
    """Median cold and warm figures over `repeat` rounds (each round: empty cache, open, open)."""
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for i in range(repeat):
        cache = work / f"cache-{impl}-{i}"
        env = dict(os.environ, ATTNPIPE_CACHE=str(cache), HF_DATASETS_CACHE=str(cache / "hf"),
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        runs["cold"].append(run_child(src, impl, data, env, with_corpus))
        runs["warm"].append(run_child(src, impl, data, env, with_corpus))
        shutil.rmtree(cache, ignore_errors=True)
    return {when: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for when, rs in runs.items()}


def export(rev: str, work: Path) -> str:
    """The pipeline/ folder of git revision `rev`, exported under `work`."""
    folder = work / f"src-{rev}"
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "pipeline")


def show(name: str, mb: int, fig: dict) -> None:
    for when in ("cold", "warm"):
        f = fig[when]
        line = (f"  {mb:>4} MB  {name:<18} {when}: {f['seconds']:6.2f} s   peak RSS {f['peak']:6.0f} MiB   "
                f"growth {f['peak'] - f['base']:6.0f} MiB   after: anon {f['RssAnon']:5.0f} / mapped {f['RssFile']:5.0f} MiB")
        if "corpus_peak" in f:
            line += (f"\n{'':>36}+ Corpus: {f['corpus_seconds']:5.2f} s   peak RSS {f['corpus_peak']:6.0f} MiB   "
                     f"after: anon {f['corpus_anon']:5.0f} / mapped {f['corpus_mapped']:5.0f} MiB")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--corpus", action="store_true", help="also build Corpus (ids, text hashes)")
    parser.add_argument("--before", help="also measure attnpipe at this git revision")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    import pyarrow

    print(f"bench_corpus: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"Python {platform.python_version()}, pyarrow {pyarrow.__version__}; median of {args.repeat}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        work = Path(tmp)
        impls = [("attnpipe", "", "attnpipe"), ("datasets", "", "datasets")]
        if args.before:
            impls.insert(1, (f"attnpipe@{args.before}", export(args.before, work), "attnpipe"))
        for mb in args.mb:
            data = work / f"corpus-{mb}mb.jsonl"
            rows = make_jsonl(data, mb)
            print(f"== {data.stat().st_size / 1e6:.0f} MB JSON Lines, {rows:,} records", flush=True)
            for name, src, impl in impls:
                results[f"{mb}:{name}"] = fig = measure(src, impl, data, work, args.repeat, args.corpus)
                show(name, mb, fig)
            ours, base = results[f"{mb}:attnpipe"], results[f"{mb}:datasets"]
            for when in ("cold", "warm"):
                print(f"  {mb:>4} MB  attnpipe / datasets, {when}: time {ours[when]['seconds'] / base[when]['seconds']:.2f}x, "
                      f"peak RSS {ours[when]['peak'] / base[when]['peak']:.2f}x")
            print(f"  {mb:>4} MB  attnpipe warm / cold time: {ours['warm']['seconds'] / ours['cold']['seconds']:.3f}x")
            data.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
