"""`attnpipe run JOB --dry-run`: the plan of a run, without loading the model and without writing
anything (no folder, no lock, no `_dataset.json`).

The output folder and version are chosen as the run would choose them (`choose_output`), the
shard plan is computed as the run would compute it (`make_plan` on the stored plan and the
committed records), and the shards still to run are listed. Tokens are estimated from a sample
of the pending documents tokenized with the model's own fast tokenizer (`tokenizers`, straight
from tokenizer.json: no transformers, no torch), scaled to the pending shards' characters, with
the window overlap (`model.stride`) and the special tokens of each window added. The output size
is estimated per recipe from rows per token and bytes per row measured on the demo corpus; it is
an estimate, not a promise: compression depends on the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from . import hub
from .job import JobSpec
from .recipes import RECIPES
from .store.commit import read_records
from .store.location import as_location
from .store.dataset import check_format, damaged_files as _damaged, choose_output, read_info
from .store.plan import ShardSpec, make_plan, shard_specs
from .words import plural

SAMPLE_DOCS = 200  # documents tokenized for the tokens-per-character ratio
SAMPLE_CHARS = 20_000  # characters of one sampled document that are tokenized (long ones are cut)
FALLBACK_CHARS_PER_TOKEN = 4.0
MAX_WINDOW = 4096  # as LoadedModel.stated_max_length: the longest window when the model states none

# Bytes per stored row, measured on the demo corpus (all-MiniLM-L6-v2, 300 documents) at each
# run.weight_dtype; zstd on other data and other file sizes gives other figures.
EDGE_BYTES = {"bfloat16": 1.9, "float16": 2.4, "float32": 6.1}  # topk and rollout, per edge row
HEAD_STATS_BYTES = {"bfloat16": 13.0, "float16": 24.0, "float32": 66.0}  # per window x layer x head
TOKENS_BYTES = 6.6  # per token (6.3 before tokens.word_index)
WORDS_BYTES_PER_TOKEN = 5.3  # the words table (one row per word, about one word per 1.02 tokens)
DOCUMENTS_BYTES_PER_TOKEN = 1.0
NOT_ESTIMATED = "not estimated (depends on the data)"


# --- the model, read from its folder without loading it --------------------------------------

def model_folder(job: JobSpec) -> Path | None:
    """The folder holding the model's tokenizer.json and config.json: the embedded default, a
    local folder, or a hub model already in the local Hugging Face cache (nothing is downloaded)."""
    name = job.model.name
    if job.model.factory:  # built by the job's own code, which a dry run does not run
        return None
    if name in hub.BUILTIN_NAMES:
        return hub.builtin_model_dir()
    if name in hub.EMBEDDED_NAMES:  # SmolLM2: its converted copy, once a run has made it
        from . import embedded

        return embedded.existing_copy()
    local = hub.local_path(name, Path(job.base_dir))
    if local.is_dir():
        return local
    if hub.is_local_only(name, Path(job.base_dir)):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=job.model.revision)
    except Exception:  # noqa: BLE001 - a cache lookup must never stop a dry run
        return None
    return Path(found).parent if isinstance(found, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _first(config: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_shape(folder: Path | None) -> dict:
    """Layers, heads, longest window and causality from config.json (and tokenizer_config.json)."""
    config = _read_json(folder / "config.json") if folder else {}
    # The encoder's shape for encoder-decoder models (attnpipe captures the encoder).
    layers = _first(config, ("encoder_layers", "num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(config, ("encoder_attention_heads", "num_attention_heads", "n_head", "num_heads"))
    limits = [config.get("max_position_embeddings"), config.get("n_positions")]
    if folder:
        limits.append(_read_json(folder / "tokenizer_config.json").get("model_max_length"))
    stated = [x for x in limits if isinstance(x, int) and 0 < x < 1 << 40]
    max_length = min(stated) if stated else MAX_WINDOW
    archs = " ".join(config.get("architectures") or [])
    causal = not config.get("is_encoder_decoder") and (
        bool(config.get("is_decoder")) or "CausalLM" in archs or "LMHead" in archs
        or config.get("model_type") in {"gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2",
                                        "qwen3", "gemma", "gemma2", "phi", "phi3", "opt", "bloom", "falcon"})
    window, why = hub.default_window(max_length, hub.declared_window(folder))
    return {"config": bool(config), "layers": layers, "heads": heads, "max_length": max_length,
            "default_window": window, "causal": causal, "window_from": why}


def load_tokenizer(folder: Path | None):
    """The fast tokenizer from tokenizer.json, with the truncation and padding some files carry
    switched off; None when there is no tokenizer.json."""
    path = folder / "tokenizer.json" if folder else None
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer means the fallback, not a failure
        return None
    tok.no_truncation()
    tok.no_padding()
    return tok


# --- windows and rows -------------------------------------------------------------------------

def windows_of(content: np.ndarray, window: int, specials: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document with `content` text tokens: (number of full windows before the last one,
    length of the last window), as the tokenizer splits a long document (`stride` tokens of
    overlap, `specials` special tokens per window). Documents without tokens have no window."""
    room = max(window - specials, 1)
    step = max(room - stride, 1)
    content = np.asarray(content, dtype=np.int64)
    extra = np.maximum(content - room, 0)
    full = np.where(content > room, np.ceil(extra / step).astype(np.int64), 0)
    last = np.where(content > 0, content - full * step + specials, 0)
    return full, last


def _sum_windows(full: np.ndarray, last: np.ndarray, window: int, f) -> float:
    """sum over every window of f(length): the full windows have the window's length."""
    return float((full * f(np.full_like(last, window))).sum() + np.where(last > 0, f(last), 0).sum())


def _queries_times_keys(k: int, causal: bool):
    """Rows a top-k recipe writes for one head of a window of n tokens: every query keeps
    min(k, keys it may see) keys."""
    def f(n: np.ndarray) -> np.ndarray:
        n = n.astype(np.float64)
        if not causal:
            return n * np.minimum(k, n)
        kk = np.minimum(k, n)
        return kk * (kk + 1) / 2 + (n - kk) * kk
    return f


def estimate_size(job: JobSpec, shape: dict, full: np.ndarray, last: np.ndarray, window: int,
                  documents: int, tokens: int) -> list[dict]:
    """Rows and bytes per recipe (and for documents and tokens), or why not estimated."""
    dtype = job.run.weight_dtype
    layers, heads = shape["layers"], shape["heads"]
    windows = float((full + (last > 0)).sum())
    out = [{"table": "documents", "recipe": None, "rows": documents, "bytes": tokens * DOCUMENTS_BYTES_PER_TOKEN},
           {"table": "tokens", "recipe": None, "rows": tokens, "bytes": tokens * TOKENS_BYTES},
           {"table": "words", "recipe": None, "rows": tokens, "bytes": tokens * WORDS_BYTES_PER_TOKEN}]
    for i, spec in enumerate(job.recipes):
        name = spec["name"]
        recipe = RECIPES[name]
        defaults = {k: f.default for k, f in recipe.params.model_fields.items() if k != "level"}  # word: in spec
        params = {**defaults, **{k: v for k, v in spec.items() if k != "name"}}
        label = name + "".join(f" {k}={v}" for k, v in params.items() if v is not None)
        row = {"table": recipe.table, "recipe": i, "name": label}
        if name in ("threshold", "topp", "dense"):
            out.append({**row, "rows": None, "bytes": None, "note": NOT_ESTIMATED})
            continue
        per_head_rows = name in ("head_stats", "attn_grad_heads", "attn_ig_heads")  # one row per window x layer x head
        edges_per_head = (name == "topk" and params.get("per_head")) or name in ("attn_grad", "attn_ig")
        if "k" not in params and not per_head_rows:  # a recipe this estimate does not know the shape of
            out.append({**row, "rows": None, "bytes": None, "note": NOT_ESTIMATED})
            continue
        if layers is None or (heads is None and (per_head_rows or edges_per_head)):
            out.append({**row, "rows": None, "bytes": None, "note": "not estimated (no layers/heads in config.json)"})
            continue
        if per_head_rows:
            rows = windows * layers * heads
            per_row = HEAD_STATS_BYTES[dtype]
        else:  # topk, rollout; attn_grad, attn_ig, grad_rollout (top k per query too)
            per_head = heads if edges_per_head else 1
            per_window = _queries_times_keys(params["k"], shape["causal"])
            rows = layers * per_head * _sum_windows(full, last, window, per_window)
            per_row = EDGE_BYTES[dtype]
        out.append({**row, "rows": int(rows), "bytes": rows * per_row})
    return out


# --- the preview -------------------------------------------------------------------------------

@dataclass
class TokenEstimate:
    """Tokens of the pending documents (corpus `rows`), estimated from a tokenizer sample."""

    folder: Path | None
    shape: dict
    tok: object  # tokenizers.Tokenizer, or None (characters / 4)
    window: int
    specials: int
    stride: int
    rows: np.ndarray
    chars: np.ndarray
    ratio: float | None
    sampled: int
    full: np.ndarray  # per document: full windows before the last one
    last: np.ndarray  # per document: length of the last window

    @property
    def doc_tokens(self) -> np.ndarray:
        return self.full * self.window + self.last

    def per_shard(self, todo: list[ShardSpec], corpus_rows: int) -> list[int]:
        """Estimated tokens of each pending shard, in `todo` order (the run's progress total)."""
        sizes = [max(min(s.stop, corpus_rows) - s.start, 0) for s in todo]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        tokens = self.doc_tokens
        return [int(tokens[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]


def estimate_tokens(job: JobSpec, corpus, todo: list[ShardSpec]) -> TokenEstimate:
    """Tokens of the documents of the shards in `todo` (what --dry-run prints and what the run's
    progress bar starts from): a sample tokenized, scaled to the characters, windows added."""
    folder = model_folder(job)
    shape = model_shape(folder)
    tok = load_tokenizer(folder)
    window = job.model.max_length or shape["default_window"]
    specials = tok.num_special_tokens_to_add(False) if tok is not None else 2
    stride = job.model.stride

    # The pending documents, in corpus row order, and their characters.
    rows = np.concatenate([np.arange(s.start, min(s.stop, len(corpus))) for s in todo]) if todo \
        else np.zeros(0, dtype=np.int64)
    chars = corpus.chars[rows] if len(rows) else np.zeros(0, dtype=np.int64)
    content = np.zeros(len(rows), dtype=np.int64)
    sampled = 0
    if len(rows):
        if tok is not None:
            pick = np.unique(np.linspace(0, len(rows) - 1, min(SAMPLE_DOCS, len(rows))).round().astype(np.int64))
            texts = corpus.texts(rows[pick])
            cut = [t[:SAMPLE_CHARS] for t in texts]
            counts = np.array([len(e.ids) for e in tok.encode_batch(cut, add_special_tokens=False)], dtype=np.int64)
            cut_chars = np.array([len(t) for t in cut], dtype=np.int64)
            ratio = counts.sum() / cut_chars.sum() if cut_chars.sum() else 1 / FALLBACK_CHARS_PER_TOKEN
            content = np.round(chars * ratio).astype(np.int64)
            whole = cut_chars == np.array([len(t) for t in texts])
            content[pick[whole]] = counts[whole]  # sampled documents: their own count
            blank = np.array([not t.strip() for t in texts])
            content[pick[blank]] = 0  # whitespace-only texts get no window
            sampled = len(pick)
        else:
            ratio = 1 / FALLBACK_CHARS_PER_TOKEN
            content = np.round(chars * ratio).astype(np.int64)
    else:
        ratio = None
    full, last = windows_of(content, window, specials, stride)
    return TokenEstimate(folder, shape, tok, window, specials, stride, rows, chars, ratio, sampled, full, last)


def preview(job: JobSpec, new_run: bool = False) -> dict:
    """What `attnpipe run` would do for `job`, computed without writing anything. Raises the
    errors the run would raise before its first shard (a changed job, a changed corpus)."""
    from .executor.base import check_inputs
    from .runtime import open_job_corpus

    root = job.output_dir()
    out = choose_output(root, job.fingerprint(), job.fingerprint_parts(), new_run)
    exists = out.isdir()
    if exists:
        check_format(out)
    info = read_info(out) if exists else None
    records = read_records(out) if exists else {}
    # As recover() would: a committed shard with a missing or truncated file is redone.
    damaged = sorted(s for s, r in records.items() if _damaged(out, r))
    committed = {s: r for s, r in records.items() if s not in damaged}
    corpus = open_job_corpus(job)
    plan = make_plan(len(corpus), job.run.num_shards, (info or {}).get("plan"), committed, job.corpus.limit)
    check_inputs(out, committed, corpus)
    specs = shard_specs(plan)
    todo = [s for s in specs if s.index not in committed]

    est = estimate_tokens(job, corpus, todo)
    folder, shape, tok, window, specials, stride = est.folder, est.shape, est.tok, est.window, est.specials, est.stride
    rows, chars, ratio, sampled, full, last = est.rows, est.chars, est.ratio, est.sampled, est.full, est.last
    doc_tokens = est.doc_tokens

    shard_rows, offset = [], 0
    for s in todo:
        n = max(min(s.stop, len(corpus)) - s.start, 0)
        part = slice(offset, offset + n)
        offset += n
        shard_rows.append({"shard": s.index, "corpus_rows": [s.start, s.stop], "documents": n,
                           "characters": int(chars[part].sum()), "tokens": int(doc_tokens[part].sum()),
                           "windows": int((full[part] + (last[part] > 0)).sum())})
    tokens = int(doc_tokens.sum())
    sizes = estimate_size(job, shape, full, last, window, len(rows), tokens)
    estimated = [x["bytes"] for x in sizes if x["bytes"] is not None]
    done_records = list(committed.values())
    return {
        "output": str(out), "root": str(root), "exists": exists,
        "version": PurePosixPath(out.root).name if out != as_location(root) else None,
        "new_run": new_run, "job": job.name, "executor": job.run.executor,
        "workers": job.run.workers, "scheduler": job.run.scheduler,
        "corpus_rows": len(corpus),
        "plan": {"num_shards": len(specs), "rows_per_shard": plan["rows_per_shard"]},
        "committed": {"shards": sorted(committed), "documents": sum(r.get("documents") or 0 for r in done_records),
                      "tokens": sum(r.get("tokens") or 0 for r in done_records)},
        "damaged": damaged,
        "to_run": shard_rows,
        "model": {"name": job.model.factory or job.model.name, "folder": str(folder) if folder else None, "layers": shape["layers"],
                  "heads": shape["heads"], "window": window,
                  "window_from": "model.max_length" if job.model.max_length else shape["window_from"], "stride": stride, "special_tokens": specials,
                  "causal": shape["causal"], "tokenizer": tok is not None, "note": _model_note(job)},
        "estimate": {"documents": int(len(rows)), "characters": int(chars.sum()), "tokens": tokens,
                     "windows": int((full + (last > 0)).sum()),
                     "tokens_per_char": round(float(ratio), 4) if ratio is not None else None,
                     "sampled_documents": sampled,
                     "method": "tokenizer sample" if tok is not None else "characters / 4 (no tokenizer.json found)",
                     "weight_dtype": job.run.weight_dtype,
                     "bytes": int(sum(estimated)), "tables": sizes,
                     "not_estimated": [f"{x['name'].split()[0]} (r{x['recipe']})"
                                       for x in sizes if x["bytes"] is None]},
    }


def _model_note(job: JobSpec) -> str | None:
    """What the dry run says about a converted embedded model (SmolLM2): its copy, or that the run makes it."""
    if job.model.factory or job.model.name not in hub.EMBEDDED_NAMES - hub.BUILTIN_NAMES:
        return None
    from . import embedded

    return embedded.dry_run_note()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_preview(p: dict, max_shards: int = 20) -> str:
    e, m = p["estimate"], p["model"]
    if not p["exists"]:
        where = "a new version; nothing is there yet" if p["version"] else "a new folder"
    elif p["committed"]["shards"] or p["damaged"]:
        where = "resumes it"
    else:
        where = "nothing committed there yet: the run takes it over"
    executor = p["executor"] + (f" ({p['workers']} workers)" if p["workers"] else "") + \
        (f" (scheduler {p['scheduler']})" if p["scheduler"] else "")
    lines = ["dry run: the model is not loaded and nothing is written",
             f"output:     {p['output']} ({where})",
             f"executor:   {executor}",
             f"corpus:     {plural(p['corpus_rows'], 'row')} in {plural(p['plan']['num_shards'], 'shard')} of up to "
             f"{p['plan']['rows_per_shard']:,} rows"]
    c = p["committed"]
    if c["shards"]:
        from .store.status import _shard_list

        lines.append(f"committed:  {plural(len(c['shards']), 'shard')} ({_shard_list(c['shards'])}): {c['documents']:,} "
                     f"documents, {c['tokens']:,} tokens; skipped")
    if p["damaged"]:
        lines.append(f"damaged:    shards {', '.join(map(str, p['damaged']))} have missing or truncated files "
                     "and will be written again")
    if not p["to_run"]:
        lines.append("to run:     nothing (every planned shard is committed)")
        return "\n".join(lines)
    lines.append(f"to run:     {plural(len(p['to_run']), 'shard')}, {plural(e['documents'], 'document')}, "
                 f"{plural(e['characters'], 'character')}")
    lines.append(f"  {'shard':>6}  {'corpus rows':>17}  {'documents':>9}  {'est. tokens':>11}")
    for s in p["to_run"][:max_shards]:
        span = f"{s['corpus_rows'][0]}-{s['corpus_rows'][1]}"
        lines.append(f"  {s['shard']:>6}  {span:>17}  {s['documents']:>9,}  {s['tokens']:>11,}")
    if len(p["to_run"]) > max_shards:
        lines.append(f"  ... and {plural(len(p['to_run']) - max_shards, 'more shard')}")
    shape = f"{m['layers']} layers x {m['heads']} heads" if m["layers"] and m["heads"] else "layers/heads unknown"
    lines.append(f"model:      {m['name']}: {shape}, windows of {m['window']} tokens ({m['window_from']}; {m['special_tokens']} special, "
                 f"{m['stride']} shared with the window before)" + (", causal" if m["causal"] else ""))
    if m.get("note"):
        lines.append(f"            {m['note']}")
    how = (f"{e['tokens_per_char']} tokens per character from {e['sampled_documents']} sampled documents"
           if m["tokenizer"] else f"no tokenizer.json found for {m['name']}: characters / 4")
    lines.append("estimates (rough; not a promise):")
    lines.append(f"  tokens      ~{e['tokens']:,} in ~{e['windows']:,} windows ({how}; window overlap and "
                 "special tokens included)")
    lines.append(f"  output      ~{_size(e['bytes'])} at weight_dtype {e['weight_dtype']}"
                 + (f", not counting {', '.join(e['not_estimated'])}" if e["not_estimated"] else "")
                 + " (bytes per row measured on the demo corpus)")
    labels = [t["table"] + (f" r{t['recipe']} {t['name']}" if t["recipe"] is not None else "") for t in e["tables"]]
    width = max(len(label) for label in labels)
    for label, t in zip(labels, e["tables"]):
        if t["bytes"] is None:
            lines.append(f"    {label:<{width}}  {t['note']}")
        else:
            lines.append(f"    {label:<{width}}  {'~' + format(t['rows'], ','):>14} rows  ~{_size(t['bytes'])}")
    return "\n".join(lines)
