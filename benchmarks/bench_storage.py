"""Storage (format 2): memory, writer throughput, bytes per token and query selectivity.

Measures, with the packaged all-MiniLM-L6-v2 (float32) on CPU and the demo corpus
jobs/data/demo_corpus.jsonl (300 documents), one shard per run:
  1 rss        peak RSS of `attnpipe run` on the 300 documents and on 3,000 (the corpus 10 times,
               new ids), default recipe set; each run in a fresh child process
  2 long doc   peak RSS and wall time of one ~1 MB document, per-head topk k=8
  3 writer     rows/s and MB/s of the streaming ShardWriter alone, on synthetic edge batches
  4 bytes      bytes per token, default recipe set, for each run.weight_dtype, per table
  5 queries    on the edges table of the 300 documents with topk k=8 per_head=true (6.3M rows): bytes
               read by a one-(layer, head) query and a one-doc_id query, each as a fraction of a
               full scan (every column of every committed file), counted by a filesystem wrapper
               under pyarrow.dataset; the row groups a doc_id query touches; DuckDB times beside
               them; the same on 3,000 documents (63M rows) as a check of how it scales
Prints each figure, a summary table (target, PASS/MISS) and the machine. Usage:
  python benchmarks/bench_storage.py [--quick] [--json FILE] [--keep DIR]
--quick: 100 docs (x3), a 100 KB document, 1.6M writer rows, queries on 100 documents (1.5M rows),
no scale check. Figures of --quick are a smoke test, not the measurement (small files: footers weigh).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from attnpipe.store import committed_files, read_records  # noqa: E402

CORPUS = REPO / "jobs" / "data" / "demo_corpus.jsonl"
PER_HEAD_TOPK = [{"name": "topk", "k": 8, "per_head": True}]

# A child that runs its command and prints the command's peak RSS (KiB) and wall time: each
# measured run gets its own wrapper, so RUSAGE_CHILDREN holds exactly one process tree.
WRAPPER = ("import json, resource, subprocess, sys, time\n"
           "t = time.perf_counter()\n"
           "rc = subprocess.run(sys.argv[1:]).returncode\n"
           "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,\n"
           "                  'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


# ---------------------------------------------------------------- helpers

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, pyarrow {pa.__version__}")


def read_corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def repeated_corpus(docs: list[dict], times: int) -> list[dict]:
    """The corpus `times` times; copies after the first get new ids (id-r1, id-r2, ...)."""
    return [dict(d, id=d["id"] if r == 0 else f"{d['id']}-r{r}") for r in range(times) for d in docs]


def write_job(path: Path, corpus: Path, out: Path, recipes: list[dict] | None = None,
              weight_dtype: str | None = None) -> Path:
    lines = [f'name = "{path.stem}"', "[corpus]", f'path = "{corpus}"', 'id_column = "id"',
             "[model]", 'name = "all-MiniLM-L6-v2"', 'dtype = "float32"',
             "[run]", f'output = "{out}"', "num_shards = 1", 'device = "cpu"']
    if weight_dtype:
        lines.append(f'weight_dtype = "{weight_dtype}"')
    for r in recipes or []:
        lines.append("[[recipes]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in r.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_measured(job: Path) -> dict:
    """`attnpipe run JOB -q` in a fresh process: {'seconds', 'maxrss_kib'} of that process."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "attnpipe.cli", "run", str(job), "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"rc": proc.returncode}
    if proc.returncode or result.get("rc"):
        raise SystemExit(f"run of {job} failed (rc {result.get('rc')}):\n{proc.stderr[-3000:]}")
    return result


def bytes_by_table(out: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """Committed bytes and rows per table, and tokens, from the commit records."""
    size: dict[str, int] = {}
    rows: dict[str, int] = {}
    tokens = 0
    for record in read_records(out).values():
        tokens += record["tokens"]
        for f in record["files"]:
            size[f["table"]] = size.get(f["table"], 0) + f["bytes"]
            rows[f["table"]] = rows.get(f["table"], 0) + f["rows"]
    return size, rows, tokens


def mib(kib: int) -> float:
    return kib / 1024


# ---------------------------------------------------------------- counting filesystem

class CountingFile(io.RawIOBase):
    """A local file that adds every byte it returns to `counter[0]`, and those of reads that end
    at the end of the file (the footer, which readers fetch first) to `counter[1]`."""

    def __init__(self, path: str, counter: list[int]):
        self.f = open(path, "rb", buffering=0)
        self.size = os.fstat(self.f.fileno()).st_size
        self.counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self._count(n or 0)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.f.read() if size is None or size < 0 else self.f.read(size)
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        self.counter[0] += n
        if n and self.f.tell() == self.size:
            self.counter[1] += n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        super().close()


class CountingLocalFS(LocalFileSystem):
    counter = [0, 0]

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, block_size, **kwargs)
        return CountingFile(self._strip_protocol(path), self.counter)


def counted_read(files: list[Path], flt=None, tail: list | None = None) -> tuple[int, int]:
    """(bytes read, rows returned) for reading every column of `files` where `flt`; the bytes of
    footer reads are appended to `tail` when given."""
    fsspec_fs = CountingLocalFS()
    fsspec_fs.counter = [0, 0]
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    dataset = ds.dataset([str(f) for f in files], format="parquet", filesystem=fs)
    table = dataset.to_table(filter=flt)
    if tail is not None:
        tail.append(fsspec_fs.counter[1])
    return fsspec_fs.counter[0], table.num_rows


def duckdb_seconds(files: list[Path], where: str, repeats: int = 3) -> float | None:
    try:
        import duckdb
    except ImportError:
        return None
    con = duckdb.connect()
    names = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    sql = f"SELECT * FROM read_parquet({names}){' WHERE ' + where if where else ''}"
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        con.sql(sql).to_arrow_table()
        best = min(best, time.perf_counter() - t)
    con.close()
    return best


# ---------------------------------------------------------------- the measurements

def bench_rss(work: Path, docs: list[dict], times: int) -> dict:
    print(f"\n== 1. peak RSS, default recipe set: {len(docs)} vs {len(docs) * times} documents")
    res = {}
    for label, rows in [("small", docs), ("large", repeated_corpus(docs, times))]:
        corpus = write_jsonl(work / f"rss-{label}.jsonl", rows)
        out = work / f"out-rss-{label}"
        m = run_measured(write_job(work / f"rss_{label}.toml", corpus, out))
        size, nrows, tokens = bytes_by_table(out)
        res[label] = {"documents": len(rows), "tokens": tokens, "peak_rss_mib": round(mib(m["maxrss_kib"]), 1),
                      "seconds": round(m["seconds"], 1), "out": str(out)}
        print(f"  {len(rows):>6} docs {tokens:>8} tokens  peak RSS {mib(m['maxrss_kib']):7.0f} MiB  "
              f"{m['seconds']:6.1f} s  ({tokens / m['seconds']:,.0f} tok/s)")
    ratio = res["large"]["peak_rss_mib"] / res["small"]["peak_rss_mib"]
    res["ratio"] = round(ratio, 3)
    print(f"  large / small peak RSS = {ratio:.2f}x  (target: within 1.25x)")
    return res


def bench_long_doc(work: Path, docs: list[dict], chars: int) -> dict:
    print(f"\n== 2. one long document (>= {chars:,} characters), topk k=8 per_head=true")
    joined = " ".join(d["text"] for d in docs)
    text = joined
    while len(text) < chars:
        text += " " + joined
    corpus = write_jsonl(work / "long.jsonl", [{"id": "long-0", "text": text}])
    out = work / "out-long"
    m = run_measured(write_job(work / "long.toml", corpus, out, PER_HEAD_TOPK))
    size, rows, tokens = bytes_by_table(out)
    res = {"characters": len(text), "tokens": tokens, "edge_rows": rows.get("edges", 0),
           "bytes": sum(size.values()), "peak_rss_mib": round(mib(m["maxrss_kib"]), 1),
           "seconds": round(m["seconds"], 1)}
    print(f"  {len(text):,} chars, {tokens:,} tokens, {rows.get('edges', 0):,} edge rows, "
          f"{sum(size.values()) / 2**20:.1f} MiB written")
    print(f"  peak RSS {res['peak_rss_mib']:.0f} MiB (target < 3072)  wall {m['seconds']:.1f} s "
          f"({rows.get('edges', 0) / m['seconds']:,.0f} edge rows/s)")
    shutil.rmtree(out, ignore_errors=True)
    return res


def synthetic_edges(rng: np.random.Generator, tokens: int, window: int, heads: int, k: int,
                    first_doc: int) -> tuple[dict, int]:
    """One layer's per-head topk rows for `tokens` tokens in windows of `window` tokens, in the
    order the recipe emits them (window, head, query, rank)."""
    windows = tokens // window
    n = windows * heads * window * k
    win = np.repeat(np.arange(windows), heads * window * k)
    head = np.tile(np.repeat(np.arange(heads, dtype=np.int16), window * k), windows)
    query = np.tile(np.repeat(np.arange(window, dtype=np.int32), k), windows * heads)
    key = rng.integers(0, window, n, dtype=np.int32)
    weight = np.sort(rng.dirichlet(np.ones(window) * 0.3, size=n // k)[:, :k], axis=1)[:, ::-1].ravel()
    doc_ids = pa.array([f"doc-{first_doc + w:08d}" for w in range(windows)])
    cols = {"doc_id": doc_ids.take(pa.array(win)), "window_index": np.zeros(n, np.int32), "head": head,
            "query_pos": query, "key_pos": key, "weight": weight.astype(np.float32)}  # the writer adds recipe*
    return cols, windows


def bench_writer(work: Path, total_rows: int) -> dict:
    from attnpipe.store.writer import ShardWriter

    print(f"\n== 3. streaming writer alone, synthetic per-head topk edges (~{total_rows / 1e6:.1f}M rows)")
    rng = np.random.default_rng(0)
    layers, heads, k, window, batch_tokens = 6, 12, 8, 128, 8192
    rows_per_call = batch_tokens * heads * k
    calls = max(1, total_rows // rows_per_call)
    batches, doc = [], 0
    for c in range(calls):  # one model batch = one call per layer; built before the clock starts
        cols, windows = synthetic_edges(rng, batch_tokens, window, heads, k, doc)
        batches.append((c % layers, cols))
        if c % layers == layers - 1:
            doc += windows
    rows = sum(len(c["head"]) for _, c in batches)
    arrow_bytes = sum(pa.table(c).nbytes for _, c in batches)
    out = work / "out-writer"
    names = sorted({d for _, c in batches for d in c["doc_id"].unique().to_pylist()})
    position = {d: i for i, d in enumerate(names)}
    by_index = [(layer, {**{k: v for k, v in c.items() if k != "doc_id"},  # as the model's rows come
                         "doc_index": np.array([position[d] for d in c["doc_id"].to_pylist()], np.int32)})
                for layer, c in batches]
    res = {}
    # doc_id strings: written at each flush; doc_index (the model's rows): sorted runs merged into
    # bands of heads and runs of documents at the end (store/runs.py)
    for dtype, indexed in (("bfloat16", False), ("float16", False), ("bfloat16", True)):
        label = dtype + (" doc_index" if indexed else "")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t = time.perf_counter()
        with ShardWriter(out, 0, "00000000", {"bench": True}, weight_dtype=dtype, heads=heads) as writer:
            writer.recipes = {0: ("topk", '{"k":8,"per_head":true}')}
            writer.doc_ids = names
            for layer, cols in (by_index if indexed else batches):
                writer.write_batch("edges", cols, layer=layer, recipe=0)
            files = writer.finalize()
            seconds = time.perf_counter() - t
        written = sum(f.bytes for f in files)
        res[label] = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                      "arrow_mb_per_s": round(arrow_bytes / seconds / 1e6, 1),
                      "written_mb_per_s": round(written / seconds / 1e6, 2),
                      "bytes_per_row": round(written / rows, 3)}
        print(f"  {label:<18} {rows:,} rows in {seconds:5.1f} s: {rows / seconds:>11,.0f} rows/s  "
              f"{arrow_bytes / seconds / 1e6:6.1f} MB/s in (Arrow)  {written / seconds / 1e6:5.2f} MB/s out  "
              f"{written / rows:.2f} B/row")
    shutil.rmtree(out, ignore_errors=True)
    return res


def bench_bytes(work: Path, corpus: Path, reuse: Path | None) -> dict:
    print("\n== 4. bytes per token, default recipe set, per run.weight_dtype")
    res = {}
    for dtype in ("bfloat16", "float16", "float32"):
        out = work / f"out-bytes-{dtype}"
        if dtype == "bfloat16" and reuse is not None:
            out = reuse  # the same job as the RSS run: its output is this one
        else:
            run_measured(write_job(work / f"bytes_{dtype}.toml", corpus, out, weight_dtype=dtype))
        size, rows, tokens = bytes_by_table(out)
        total = sum(size.values())
        res[dtype] = {"bytes_per_token": round(total / tokens, 1), "tokens": tokens, "bytes": total,
                      "tables": {t: {"bytes": b, "rows": rows[t], "bytes_per_token": round(b / tokens, 1),
                                     "bytes_per_row": round(b / rows[t], 2)} for t, b in sorted(size.items())}}
    tables = sorted({t for r in res.values() for t in r["tables"]})
    print(f"  {'table':<11}" + "".join(f"{d:>22}" for d in res))
    for t in tables:
        print(f"  {t:<11}" + "".join(
            f"{r['tables'][t]['bytes_per_token']:>10.1f} B/tok {r['tables'][t]['bytes_per_row']:>5.2f} B/r"
            for r in res.values()))
    print(f"  {'total':<11}" + "".join(f"{r['bytes_per_token']:>10.1f} B/tok{'':>10}" for r in res.values()))
    print(f"  ({next(iter(res.values()))['tokens']:,} model tokens: window tokens, specials and overlap included)")
    return res


def row_groups_touched(files: list[Path], doc_id: str) -> tuple[int, int, float]:
    """Row groups whose doc_id statistics admit `doc_id`: (touched, total, share of data bytes)."""
    touched = total = 0
    hit_bytes = all_bytes = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        col = md.schema.to_arrow_schema().get_field_index("doc_id")
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            size = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            st = rg.column(col).statistics
            total += 1
            all_bytes += size
            if st is None or not st.has_min_max or st.min <= doc_id <= st.max:
                touched += 1
                hit_bytes += size
    return touched, total, hit_bytes / all_bytes


def query_fractions(out: Path, label: str, layer: int, head: int) -> dict:
    """Bytes read by a one-(layer, head) and a one-doc_id query on the committed edges of `out`,
    each as a fraction of a full scan; DuckDB times of the same queries."""
    files = committed_files(out, "edges")
    size, rows, tokens = bytes_by_table(out)
    metas = [pq.ParquetFile(f).metadata for f in files]
    groups = sum(md.num_row_groups for md in metas)
    footers = sum(md.serialized_size + 8 for md in metas)
    print(f"  [{label}] {rows['edges']:,} edge rows, {len(files)} files, {size['edges'] / 2**20:.1f} MiB, "
          f"{groups} row groups, footers {footers / 2**10:.0f} KiB in all")
    tails: list[int] = []
    full, full_rows = counted_read(files, tail=tails)
    assert full_rows == rows["edges"]
    doc_ids = sorted(ds.dataset([str(f) for f in committed_files(out, "documents")], format="parquet")
                     .to_table(columns=["doc_id"]).column("doc_id").to_pylist())
    picks = [doc_ids[int(i)] for i in np.linspace(0, len(doc_ids) - 1, 5)]
    lh_bytes, lh_rows = counted_read(files, (ds.field("layer") == layer) & (ds.field("head") == head), tails)
    doc = []
    for d in picks:
        b, n = counted_read(files, ds.field("doc_id") == d, tails)
        touched, total, share = row_groups_touched(files, d)
        doc.append({"doc_id": d, "bytes": b, "footer_bytes": tails[-1], "rows": n, "fraction": round(b / full, 4),
                    "row_groups_touched": touched, "row_groups": total, "touched_data_share": round(share, 4)})
    res = {"label": label, "edge_rows": rows["edges"], "files": len(files), "row_groups": groups,
           "footer_bytes": footers,
           "full_scan_bytes": full, "full_scan_footer_bytes": tails[0],
           "layer_head": {"layer": layer, "head": head, "bytes": lh_bytes, "footer_bytes": tails[1], "rows": lh_rows,
                          "fraction": round(lh_bytes / full, 4)},
           "doc_id": doc, "doc_id_fraction_mean": round(float(np.mean([d["fraction"] for d in doc])), 4),
           "doc_id_fraction_max": max(d["fraction"] for d in doc)}
    t_full = duckdb_seconds(files, "")
    t_lh = duckdb_seconds(files, f"layer = {layer} AND head = {head}")
    t_doc = duckdb_seconds(files, f"doc_id = '{picks[2]}'")
    res["duckdb_seconds"] = {"full": t_full, "layer_head": t_lh, "doc_id": t_doc}
    print(f"  (every query first reads the end of every file, footer included: {tails[1] / 2**10:.0f} KiB here)")
    print(f"  full scan             {full / 2**20:8.2f} MiB read, {full_rows:>10,} rows"
          + (f"                 duckdb {t_full * 1000:7.1f} ms" if t_full is not None else ""))
    print(f"  layer {layer} head {head:<3}         {lh_bytes / 2**20:8.2f} MiB read, {lh_rows:>10,} rows  "
          f"{lh_bytes / full:6.1%} of full" + (f"   duckdb {t_lh * 1000:7.1f} ms" if t_lh is not None else ""))
    for i, d in enumerate(doc):
        dt = f"   duckdb {t_doc * 1000:7.1f} ms" if i == 2 and t_doc is not None else ""
        print(f"  doc_id {d['doc_id']:<14} {d['bytes'] / 2**20:8.2f} MiB read, {d['rows']:>10,} rows  "
              f"{d['fraction']:6.1%} of full{dt}   (row groups {d['row_groups_touched']}/{d['row_groups']}, "
              f"{d['touched_data_share']:.0%} of data bytes)")
    return res


def bench_queries(work: Path, docs: list[dict], scale_times: int) -> dict:
    print("\n== 5. query selectivity on the edges table (topk k=8 per_head=true): bytes read / full scan")
    res = {}
    corpora = [("per_head", docs)]
    if scale_times > 1:  # the same check on a 10x larger shard; copies take a prefix (r3-demo-0001), so a
        # document's copies sit in other chunks and do not compress against each other
        corpora.append(("scale", [dict(d, id=f"r{r}-{d['id']}") for r in range(scale_times) for d in docs]))
    for key, rows in corpora:
        corpus = write_jsonl(work / f"queries-{key}.jsonl", rows)
        out = work / f"out-queries-{key}"
        m = run_measured(write_job(work / f"queries_{key}.toml", corpus, out, PER_HEAD_TOPK))
        res[key] = query_fractions(out, f"{len(rows)} docs, run {m['seconds']:.0f} s", 3, 5)
        if key == "scale":
            shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller inputs: a smoke run of a few minutes")
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder, removed)")
    ap.add_argument("--only", default="1,2,3,4,5", help="comma-separated parts to run (default: all)")
    args = ap.parse_args()
    parts = {int(p) for p in args.only.split(",")}
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_storage-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = read_corpus()
    if args.quick:
        docs = docs[:100]
    times, long_chars, writer_rows = (3, 100_000, 1_600_000) if args.quick else (10, 1_000_000, 6_000_000)
    mach = machine()
    print(f"bench_storage{' --quick' if args.quick else ''}: {mach}")
    results: dict = {"quick": args.quick, "machine": mach, "documents": len(docs)}
    started = time.perf_counter()
    try:
        corpus = write_jsonl(work / "demo.jsonl", docs)
        if 1 in parts:
            results["rss"] = bench_rss(work, docs, times)
        if 2 in parts:
            results["long_doc"] = bench_long_doc(work, docs, long_chars)
        if 3 in parts:
            results["writer"] = bench_writer(work, writer_rows)
        if 4 in parts:
            reuse = Path(results["rss"]["small"]["out"]) if "rss" in results else None
            results["bytes"] = bench_bytes(work, corpus, reuse)
        if 5 in parts:
            results["queries"] = bench_queries(work, docs, 1 if args.quick else times)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)

    rows = []
    if "rss" in results:
        r = results["rss"]
        rows.append((f"peak RSS {r['large']['documents']} / {r['small']['documents']} docs",
                     f"{r['ratio']:.2f}x ({r['large']['peak_rss_mib']:.0f} / {r['small']['peak_rss_mib']:.0f} MiB)",
                     "<= 1.25x", r["ratio"] <= 1.25))
    if "long_doc" in results:
        r = results["long_doc"]
        rows.append((f"peak RSS, one {r['characters'] / 1e6:.2f} MB doc", f"{r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s",
                     "< 3072 MiB", r["peak_rss_mib"] < 3072))
    if "writer" in results:
        r = results["writer"]["bfloat16"]
        rows.append(("writer alone (bfloat16)", f"{r['rows_per_s'] / 1e6:.2f}M rows/s, {r['arrow_mb_per_s']:.0f} MB/s in",
                     "(figure)", None))
        m = results["writer"]["bfloat16 doc_index"]
        rows.append(("  same, doc_index, merged runs", f"{m['rows_per_s'] / 1e6:.2f}M rows/s "
                     f"({m['rows_per_s'] / r['rows_per_s']:.2f}x), {m['bytes_per_row']:.2f} B/row", "(figure)", None))
    if "bytes" in results:
        for dtype, r in results["bytes"].items():
            ok = r["bytes_per_token"] <= 250 if dtype == "bfloat16" else None
            rows.append((f"bytes/token, default set, {dtype}", f"{r['bytes_per_token']:.1f}",
                         "<= 250" if dtype == "bfloat16" else "(figure)", ok))
    if "queries" in results:
        r = results["queries"]["per_head"]
        rows.append((f"(layer, head) query, {r['edge_rows'] / 1e6:.1f}M rows", f"{r['layer_head']['fraction']:.1%} of full scan",
                     "<= 10%", r["layer_head"]["fraction"] <= 0.10))
        rows.append(("doc_id query (max of 5 docs)", f"{r['doc_id_fraction_max']:.1%} of full scan "
                     f"(mean {r['doc_id_fraction_mean']:.1%})", "<= 10%", r["doc_id_fraction_max"] <= 0.10))
        if "scale" in results["queries"]:
            r = results["queries"]["scale"]
            rows.append((f"  same, {r['edge_rows'] / 1e6:.0f}M rows (10x the documents)",
                         f"doc {r['doc_id_fraction_max']:.1%} (mean {r['doc_id_fraction_mean']:.1%}), "
                         f"(layer, head) {r['layer_head']['fraction']:.1%}", "(figure)", None))
    print(f"\n{'figure':<40} {'measured':<38} {'target':<11} result")
    for name, value, target, ok in rows:
        print(f"{name:<40} {value:<38} {target:<11} {'' if ok is None else 'PASS' if ok else 'MISS'}")
    if args.quick:
        print("(--quick: smaller inputs, a smoke run; the targets are meant for the full run)")
    print(f"\nmachine: {mach}\ntotal {results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
