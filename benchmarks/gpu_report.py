"""benchmarks/gpu_check.py's output folder: the JSON figures, the summary with issue 17's targets,
and table.md (the tables for benchmarks/RESULTS-extract.md). At most 8 files, none in subfolders,
so that all of them come back from the device tool."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

FILES = ("summary.json", "extract.json", "long.json", "tests.json", "table.md", "log.txt")
LOG_TAIL = 200_000  # characters of each step's output kept in log.txt
METHODS = ["sdpa", "eager", "naive", "eager+red", "attnpipe", "attnpipe+perhead"]


def write(ctx, steps, complete: bool, elapsed: float) -> None:
    """Every file from what the steps left in the work folder; summary.json last, so that a
    summary saying complete is never beside figures still being written."""
    figures = {"extract": merge_extract(ctx.work), "long": load(ctx.work / "long.json"), "tests": ctx.facts.get("tests")}
    for name, value in figures.items():
        if value is not None:
            dump(ctx.out / f"{name}.json", value)
    env = ctx.facts.get("env", {})
    checks = targets(figures["extract"], figures["long"]) if not ctx.dry else []
    atomic(ctx.out / "table.md", tables(env, figures["extract"], figures["long"], checks))
    atomic(ctx.out / "log.txt", log(steps))
    failed = [s.name for s in steps if s.status in ("failed", "timed out")]
    dump(ctx.out / "summary.json", {
        "complete": complete, "mode": "cpu-dry" if ctx.dry else "gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": ctx.args.budget, "elapsed_s": round(elapsed, 1), "env": env,
        "install": ctx.facts.get("install"), "attnpipe_install": ctx.facts.get("attnpipe_install"),
        "steps": [s.record() for s in steps], "failed": failed, "targets": checks,
        "files": [f for f in FILES if (ctx.out / f).exists()]})


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def dump(path: Path, value) -> None:
    atomic(path, json.dumps(value, indent=1, default=str, allow_nan=True))


def merge_extract(work: Path) -> dict | None:
    """bench_extract's one-row files as one: {"machine", "rows"} (rows of the GPU table, or of its
    --quick smoke run on a CPU)."""
    parts = [load(p) for p in sorted(work.glob("extract-*.json"))]
    if not parts:
        return None
    rows = [row for part in parts for row in part.get("gpu", part.get("quick", []))]
    return {"machine": next((p["machine"] for p in parts if "machine" in p), None), "rows": rows}


def read_junit(path: Path) -> dict:
    """pytest's junit XML as counts, the failed tests' names and the skip reasons."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    failed, skipped, passed = [], Counter(), 0
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped[skip.get("message", "")] += 1
        else:
            passed += 1
    return {"tests": passed + len(failed) + sum(skipped.values()), "passed": passed, "failed": len(failed),
            "skipped": sum(skipped.values()), "failed_tests": failed, "skip_reasons": dict(skipped)}


# ---------------------------------------------------------------- issue 17's targets

def _ratio(row: dict, method: str, key: str) -> float | None:
    a, s = row.get(method, {}), row.get("sdpa", {})
    if not a.get(key) or not s.get(key) or a.get(key) != a.get(key):  # missing, zero or NaN (OOM)
        return None
    return a[key] / s[key]


def targets(extract: dict | None, long: dict | None) -> list[dict]:
    """Each target with its figure and whether it is met (None: the figure is missing)."""
    checks = []

    def check(what: str, value: float | None, ok) -> None:
        checks.append({"target": what, "value": value, "met": None if value is None else bool(ok(value))})

    for row in (extract or {}).get("rows", []):
        label = f"{row['model']} {row['batch']}x{row['tokens']}"
        if row["model"] in ("bert-base", "llama-gqa"):
            check(f"{label}: attnpipe speed >= 0.5x sdpa", _ratio(row, "attnpipe", "tok_s"), lambda v: v >= 0.5)
            check(f"{label}: attnpipe per-head topk speed >= 0.3x sdpa", _ratio(row, "attnpipe+perhead", "tok_s"),
                  lambda v: v >= 0.3)
        check(f"{label}: attnpipe peak GPU memory <= 1.5x sdpa", _ratio(row, "attnpipe", "peak_gib"), lambda v: v <= 1.5)
    for row in (long or {}).get("rows", []):
        check(f"long {row['tokens']} tokens: attnpipe peak memory <= 1.5x sdpa", row.get("memory_ratio"),
              lambda v: v <= 1.5)
    if long:
        done = [r["tokens"] for r in long.get("rows", []) if "median_s" in r.get("attnpipe", {})]
        check("32k tokens on the fused path", max(done, default=None), lambda v: v >= 32768)
    return checks


# ---------------------------------------------------------------- table.md

def _cell(m: dict, base: float) -> str:
    if not m or m.get("tok_s") != m.get("tok_s") or "tok_s" not in m:  # absent or NaN
        return "OOM" if m.get("oom") else "-"
    return f"{m['tok_s']:,.0f} ({m['tok_s'] / base:.2f}x) [{m['peak_gib']:.1f}]"


def tables(env: dict, extract: dict | None, long: dict | None, checks: list[dict]) -> str:
    where = env.get("gpu") or "CPU (dry run: tiny shapes, not figures)"
    lines = [f"## GPU: {where}", "", f"`bash benchmarks/gpu_check.sh` on {time.strftime('%Y-%m-%d')}: "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}; nvidia-smi: {env.get('nvidia_smi', '-')}.", ""]
    if extract and extract["rows"]:
        lines += ["Extraction, tokens/s (ratio to sdpa) [peak GiB], median of 3, random weights:", "",
                  "| model | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
        for r in extract["rows"]:
            base = r.get("sdpa", {}).get("tok_s") or float("nan")
            lines.append(f"| {r['model']} {r['batch']} x {r['tokens']} {r.get('dtype', '')} | "
                         + " | ".join(_cell(r.get(m, {}), base) for m in METHODS) + " |")
        lines.append("")
    if long and long.get("rows"):
        m = long["model"]
        lines += [f"Long context, one window: Llama GQA ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, "
                  f"{m['kv_heads']} key/value heads, {m['dtype']}), head_stats + topk, on {long['device']}:", "",
                  "| tokens | sdpa s | sdpa peak GiB | attnpipe s | attnpipe peak GiB | memory vs sdpa | speed vs sdpa |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in long["rows"]:
            s, a = r["sdpa"], r["attnpipe"]
            num = lambda d, k: f"{d[k]:.3f}" if k in d else ("OOM" if d.get("oom") else "failed")  # noqa: E731
            ratio = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
            lines.append(f"| {r['tokens']:,} | {num(s, 'median_s')} | {num(s, 'peak_gib')} | {num(a, 'median_s')} "
                         f"| {num(a, 'peak_gib')} | {ratio('memory_ratio')} | {ratio('speed_ratio')} |")
        lines.append("")
    if checks:
        lines += ["Targets (issue 17):", ""] + [
            f"- {c['target']}: {'-' if c['value'] is None else round(c['value'], 2)} "
            f"{ {True: 'met', False: 'NOT met', None: 'no figure'}[c['met']] }" for c in checks] + [""]
    return "\n".join(lines)


def log(steps) -> str:
    parts = []
    for s in steps:
        parts.append(f"===== {s.name}: {s.status} in {s.seconds:.1f} s {s.reason}\n{s.output[-LOG_TAIL:]}")
    return "\n".join(parts)
