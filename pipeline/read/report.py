"""`attnpipe report OUT -o report.html`: one self-contained HTML file about a dataset.

Everything is inlined (styles, the script, figures as data: URIs, the head view's data as JSON)
and a Content-Security-Policy forbids any request, so the file opens offline and never reaches
the network. Sections: provenance and table sizes; the head atlas and its grids; heatmaps of a
few documents; an interactive head view of chosen documents (bertviz-like: pick a layer and a
head, point at a token, see what it attends to).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ReadError
from . import heads as heads_mod
from .matrices import SITES, attention_matrix, clean_token, head_name, parse_site, sides

ASSETS = Path(__file__).parent / "assets"
GRID_STATS = ("entropy_norm", "first_mass", "sep_mass", "prev_mass", "next_mass", "mean_distance")
MAX_VIEW_TOKENS = 64  # longer windows are cut in the head view (a column of 64 tokens still reads)
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
PROVENANCE_KEYS = ("model", "source", "revision", "weights_sha256", "tokenizer", "dtype", "weight_dtype",
                   "attention_backend", "causal", "num_layers", "num_heads", "window_length", "stride")


def choose_documents(ds, wanted: list[str] | None, count: int) -> list[str]:
    """The documents shown: those asked for, else the first `count` short ones by doc_id,
    preferring documents with dense maps (the head view is exact for them)."""
    known = ds.sql("SELECT doc_id, windows, content_tokens FROM documents WHERE NOT empty ORDER BY doc_id")
    if wanted:
        missing = [d for d in wanted if d not in set(known["doc_id"])]
        if missing:
            quoted = missing[0].replace("'", "''")
            if len(ds.sql(f"SELECT 1 FROM documents WHERE doc_id = '{quoted}' AND empty")):
                raise ReadError(f"document {missing[0]!r} is empty: its text has no tokens, so there is no "
                                "attention to show (its documents row says empty = true)")
            raise ReadError(f"document {missing[0]!r} is not in {ds.path}; e.g. {', '.join(known['doc_id'][:3])}")
        return list(wanted)
    short = known[(known["windows"] == 1) & (known["content_tokens"] <= MAX_VIEW_TOKENS - 2)]
    if "maps" in ds.tables:
        dense = set(ds.sql("SELECT DISTINCT doc_id FROM maps")["doc_id"])
        short = short.assign(dense=short["doc_id"].isin(dense)).sort_values(["dense", "doc_id"], ascending=[False, True])
    chosen = short["doc_id"].head(count).tolist()
    return chosen or known["doc_id"].head(count).tolist()


def _views(ds, doc_id: str, counts: dict[str, int]) -> tuple[dict, list, list, list]:
    """Every (site, layer, head) of a document's window 0 as edge lists {q, k, w, source}: dense
    maps where stored, else the densest edges recipe, plus rollout as the head 'rollout'. Sites
    are '' for single-sequence runs; encoder-self, decoder-self and decoder-cross in pair runs.
    `counts`: the tokens drawn per side."""
    views: dict[str, dict] = {}
    quoted = doc_id.replace("'", "''")
    # The head view draws tokens: rows of word-level recipes (which index words) are left out.
    base = f"""doc_id = '{quoted}' AND window_index = 0 AND recipe_params NOT LIKE '%"level":"word"%'"""
    for site in (SITES if ds.pairs else ("",)):
        where = base
        if site:
            stack, _, attention = site.partition("-")
            where += f" AND stack = '{stack}' AND attention = '{attention}'"
        q_side, k_side = sides(ds, parse_site(site) if site else None)
        where += f" AND query_pos < {counts[q_side]}"
        for key, part in _site_views(ds, where, counts[k_side]).items():
            views[f"{site}|{key}"] = part
    layers = sorted({int(k.split("|")[1]) for k in views})
    head_keys = {k.split("|")[2] for k in views}
    numbered = sorted(int(h) for h in head_keys if h != "rollout")
    heads = [str(h) for h in numbered] + (["rollout"] if "rollout" in head_keys else [])
    sites = [s for s in (SITES if ds.pairs else ("",)) if any(k.startswith(f"{s}|") for k in views)]
    return views, layers, heads, sites


def _site_views(ds, where: str, keys: int) -> dict[str, dict]:
    """{"layer|head": edge list} of one site's rows (`where` selects them)."""
    views: dict[str, dict] = {}
    if "edges" in ds.tables:
        edges = ds.sql(f"SELECT layer, head, query_pos, key_pos, weight, recipe, recipe_params FROM edges "
                       f"WHERE {where} AND key_pos < {keys}")
        for (layer, head), part in edges.groupby(["layer", "head"]):
            key = part.groupby(["recipe", "recipe_params"]).size().idxmax()
            part = part[(part["recipe"] == key[0]) & (part["recipe_params"] == key[1])]
            views[f"{layer}|{head}"] = _edge_list(part, f"edges, {key[0]} {key[1]} (sparse: only stored edges)")
    if "maps" in ds.tables:
        maps = ds.sql(f"SELECT layer, head, query_pos, weights FROM maps WHERE {where}")
        for (layer, head), part in maps.groupby(["layer", "head"]):
            q, k, w = [], [], []
            for qp, row in zip(part["query_pos"], part["weights"]):
                row = np.asarray(row[:keys], dtype=float)
                keep = np.nonzero(row >= 0.005)[0]  # lines under half a percent are invisible anyway
                q += [int(qp)] * len(keep)
                k += keep.tolist()
                w += [round(float(x), 4) for x in row[keep]]
            views[f"{layer}|{head}"] = {"q": q, "k": k, "w": w, "source": "maps (dense; lines under 0.005 not drawn)"}
    if "rollout" in ds.tables:
        rollout = ds.sql(f"SELECT layer, query_pos, key_pos, weight, recipe, recipe_params FROM rollout "
                         f"WHERE {where} AND key_pos < {keys}")
        for layer, part in rollout.groupby("layer"):
            views[f"{layer}|rollout"] = _edge_list(part, "rollout up to this layer (top keys per query)")
    return views


def _edge_list(part, source: str) -> dict:
    return {"q": part["query_pos"].astype(int).tolist(), "k": part["key_pos"].astype(int).tolist(),
            "w": [round(float(x), 4) for x in part["weight"]], "source": source}


def head_view_data(ds, doc_ids: list[str]) -> dict:
    """Per document: its tokens per side (window 0, at most MAX_VIEW_TOKENS each), the sites,
    layers and heads with rows, and the views. A site's query tokens are drawn on the left and
    its key tokens on the right (cross-attention: target on the left, source on the right)."""
    docs = []
    for doc_id in doc_ids:
        tokens = ds.tokens(doc_id, 0)
        by_side = {side: [clean_token(t) for t in part["token"]][:MAX_VIEW_TOKENS]
                   for side, part in (tokens.groupby("side") if "side" in tokens.columns else [("source", tokens)])}
        by_side.setdefault("source", [])
        by_side.setdefault("target", [])
        views, layers, heads, sites = _views(ds, doc_id, {s: len(t) for s, t in by_side.items()})
        if views:
            docs.append({"doc_id": doc_id, "window_index": 0, "tokens": by_side["source"],
                         "target_tokens": by_side["target"], "sites": sites, "layers": layers,
                         "heads": heads, "views": views})
    if not docs:
        raise ReadError(f"{ds.path} has no edges, maps or rollout rows for {', '.join(doc_ids)}: "
                        "the head view needs one of the topk/threshold/topp, dense or rollout recipes")
    return {"docs": docs}


# --- HTML ----------------------------------------------------------------------------------------

def _e(value) -> str:
    return html.escape(str(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _provenance_section(ds) -> str:
    p = ds.provenance
    rows = [[k, p[k]] for k in PROVENANCE_KEYS if k in p]
    rows.append(["recipes", ", ".join(f"{k} v{v}" for k, v in p.get("recipes", {}).items())])
    rows.append(["versions", ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items())])
    recipes = ", ".join(json.dumps(r, sort_keys=True) for r in ds.job.get("recipes", []))
    tables = [[t, f"{v['rows']:,}", v["files"], f"{v['bytes'] / 1e6:.2f} MB",
               f"{v['layers'][0]}..{v['layers'][-1]}" if v["layers"] else ""] for t, v in ds.tables.items()]
    return (f'<section id="provenance"><h2>Provenance</h2>{_table(["key", "value"], rows)}'
            f'<p class="note">job recipes: <code>{_e(recipes)}</code></p></section>'
            f'<section id="tables"><h2>Tables</h2>'
            f'{_table(["table", "rows", "files", "size", "layers"], tables, {1, 2, 3})}'
            f'<p class="note">Committed shards: {len(ds.records)}. Only files listed by the commit records are read.</p></section>')


def _atlas_section(atlas, rules) -> str:
    shown = heads_mod.display_frame(atlas)
    rows = shown.values.tolist()
    thresholds = ", ".join(f"{k} = {v:g}" for k, v in vars(rules).items())
    counts = atlas["label"].value_counts()
    summary = ", ".join(f'<span class="label">{_e(k)}</span> {v}' for k, v in counts.items())
    return (f'<section id="atlas"><h2>Head atlas</h2>'
            f'<p class="note">Mean ± standard deviation over windows (each window weighted equally); '
            f'entropy is normalised by ln(keys seen). Labels: first matching rule of {_e(thresholds)}.</p>'
            f'<p>{summary}</p><div class="scroll">'
            f'{_table(list(shown.columns), rows, set(range(3, len(shown.columns))))}</div></section>')


def _grids_section(atlas) -> str:
    from .plots import grid_figure, render

    figs = "".join(f"<figure>{_img(render(grid_figure(atlas, s)), s)}<figcaption>{_e(s)}</figcaption></figure>"
                   for s in GRID_STATS)
    return f'<section id="grids"><h2>Head grids</h2><div class="figs">{figs}</div></section>'


def _heatmaps_section(ds, doc_ids: list[str]) -> str:
    from .plots import matrix_figure, render

    figs = []
    last = max(ds.tables.get("edges", ds.tables.get("maps", {"layers": [0]}))["layers"] or [0])
    for doc_id in doc_ids:
        for layer in sorted({0, last}):
            try:
                m = attention_matrix(ds, doc_id, layer, -1)
            except ReadError:
                continue
            figs.append(f"<figure>{_img(render(matrix_figure(m, max_size=7)), m.title)}"
                        f"<figcaption>{_e(m.title)}: {_e(m.source)}</figcaption></figure>")
    body = "".join(figs) or '<p class="note">No maps or mean-of-heads edges were stored.</p>'
    return f'<section id="heatmaps"><h2>Heatmaps ({_e(head_name(-1))})</h2><div class="figs">{body}</div></section>'


# Inside <script>, '<!--' and '<script' change how the HTML parser looks for the end of the
# block, '</' can end it, and U+2028/9 end lines in older JS parsers: none may appear
# as written. JSON's \\u escapes keep the parsed data identical.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                              "\u2028": "\\u2028", "\u2029": "\\u2029"})


def script_json(data) -> str:
    """`data` as JSON that no string inside it can end or alter a <script> block."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).translate(_SCRIPT_SAFE)


def _head_view_section(data: dict) -> str:
    payload = script_json(data)
    script = (ASSETS / "head_view.js").read_text(encoding="utf-8")
    return (f'<section id="head-view"><h2>Interactive head view</h2>'
            f'<div id="hv-controls"><label>document <select id="hv-doc"></select></label>'
            f'<label id="hv-site-label">attention <select id="hv-site"></select></label>'
            f'<label>layer <select id="hv-layer"></select></label>'
            f'<label>head <select id="hv-head"></select></label><span id="hv-source"></span></div>'
            f'<p class="note">Window 0 of each document, its first {MAX_VIEW_TOKENS} tokens. Lines: '
            f'dense maps where the dense recipe stored them, else the stored edges (sparse).</p>'
            f'<div id="hv-info"></div><svg id="hv-svg" xmlns="http://www.w3.org/2000/svg"></svg>'
            f'<script type="application/json" id="hv-data">{payload}</script>'
            f"<script>{script}</script></section>")


def build_report(ds, docs: list[str] | None = None, count: int = 3, rules=None) -> str:
    """The report of dataset `ds` as one HTML string."""
    rules = rules or heads_mod.Rules()
    doc_ids = choose_documents(ds, docs, count)
    parts = [_provenance_section(ds)]
    if "head_stats" in ds.tables:
        atlas = heads_mod.head_atlas(ds, rules)
        parts += [_atlas_section(atlas, rules), _grids_section(atlas)]
    else:
        parts.append('<section id="atlas"><h2>Head atlas</h2><p class="note">No head_stats table: '
                     'add the head_stats recipe to the job.</p></section>')
    parts += [_heatmaps_section(ds, doc_ids), _head_view_section(head_view_data(ds, doc_ids))]
    name = ds.job.get("name") or ds.path.name
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in (("provenance", "Provenance"), ("tables", "Tables"),
                  ("atlas", "Head atlas"), ("grids", "Grids"), ("heatmaps", "Heatmaps"), ("head-view", "Head view")))
    css = (ASSETS / "report.css").read_text(encoding="utf-8")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>attnpipe report: {_e(name)}</title><style>{css}</style></head>'
            f'<body><header><h1>attnpipe report: {_e(name)}</h1><p>{_e(ds.path)} · '
            f'{_e(ds.provenance.get("model", "?"))} · attnpipe {_e(__version__)} · '
            f'{time.strftime("%Y-%m-%d %H:%M")}</p></header><nav>{nav}</nav><main>{"".join(parts)}</main></body></html>')


def write_report(ds, out: str | Path, docs: list[str] | None = None, count: int = 3, rules=None) -> Path:
    from .output import refuse_inside

    refuse_inside(out, ds.path)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReadError(f"the report is one HTML file: name it .html, not {out.name}")
    if not out.parent.is_dir():
        raise ReadError(f"cannot write {out}: folder {out.parent} does not exist")
    text = build_report(ds, docs, count, rules)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
