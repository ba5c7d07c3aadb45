"""The `attnpipe` command line. Library errors become one-line messages (exit 1) here and only
here; `--debug` shows the traceback instead."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import sys
import textwrap
import threading

import click

from .errors import AttnpipeError, OutputError


def command_boundary(fn):
    """Shared --debug flag; AttnpipeError -> one-line ClickException unless debugging."""

    @click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttnpipeError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnpipe")
def cli():
    """attnpipe: corpus-scale attention datasets from Hugging Face transformers, as Parquet."""


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", help="Output directory (overrides run.output).")
@click.option("--corpus", "corpus_path", help="Corpus file, folder or glob (corpus.path), relative to where you run attnpipe.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N documents (corpus.limit).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps (run.device).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="model.dtype.")
@click.option("--model", "model_name", help="Model directory or hub name (model.name).")
@click.option("--num-shards", type=click.IntRange(min=1), help="run.num_shards.")
@click.option("--batch-tokens", type=click.IntRange(min=1), help="run.batch_tokens.")
@click.option("--executor", type=click.Choice(["local", "dask"]), help="run.executor: this process, or Dask.")
@click.option("--workers", type=click.IntRange(min=1),
              help="run.workers: start a local Dask cluster of N workers (implies --executor dask).")
@click.option("--scheduler", help="run.scheduler: join the Dask cluster at this address (implies --executor dask).")
@click.option("--retries", type=click.IntRange(min=0), help="run.retries: attempts after the first for a failing shard.")
@click.option("--new-run", is_flag=True,
              help="Start a new version (OUTPUT/v2, v3, ...) beside the old data, after the job, the "
                   "corpus or the model changed. Rerun without it to resume that version.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (output folder, committed shards, shards to run with their rows and "
                   "documents, estimated tokens and output size) without loading the model or writing anything.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@command_boundary
def run(job_file, output, corpus_path, limit, device, dtype, model_name, num_shards, batch_tokens, executor, workers,
        scheduler, retries, new_run, dry_run, quiet):
    """Run JOB_FILE (TOML): corpus -> model -> recipes -> Parquet tables. Each shard is committed
    on its own; a rerun of the same job skips committed shards."""
    from .job import load_job

    # The job file is checked before torch, datasets or the model are imported.
    job = load_job(job_file, overrides={
        "run.output": output, "corpus.path": _from_here(corpus_path), "corpus.limit": limit, "run.device": device, "model.dtype": dtype,
        "model.name": model_name, "run.num_shards": num_shards, "run.batch_tokens": batch_tokens,
        "run.executor": executor or ("dask" if workers or scheduler else None), "run.workers": workers,
        "run.scheduler": scheduler, "run.retries": retries})
    if str(job.output_dir()).startswith("memory://"):
        from .errors import JobError

        raise JobError(f"output {job.output_dir()}: memory:// data lives only inside the process that writes "
                       "it and would be gone when this command ends; write to a folder or a persistent URL "
                       "(s3://, gs://, ...), or use memory:// from Python (attnpipe.run)")
    show_notes(quiet)
    if dry_run:  # no torch, no model, nothing written
        import datasets

        from .plan_preview import format_preview, preview

        datasets.disable_progress_bars()
        click.echo(format_preview(preview(job, new_run=new_run)))
        return
    from .executor import Terminated, stop_on_sigterm
    from .executor import run as run_executor
    from .runtime import quiet_libraries
    from .words import plural

    quiet_libraries(quiet)
    try:
        with stop_on_sigterm():
            summary = run_executor(job, quiet=quiet, new_run=new_run)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: the run has cleaned up on its way out
        how, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C (SIGINT)", 130)
        click.echo(f"stopped by {how}: shards committed before it are kept in {job.output_dir()}, the "
                   "unfinished one was removed and the lock released; rerun the same command to continue",
                   err=True)
        raise SystemExit(code) from None
    if not quiet:
        t = summary.totals
        skipped = f", {len(summary.shards_skipped)} already committed" if summary.shards_skipped else ""
        click.echo(f"wrote {summary.output}: {plural(len(summary.shards_run), 'shard')} run{skipped}; "
                   f"{t['documents']} documents ({t['empty_documents']} empty), {t['windows']} windows, "
                   f"{t['tokens']} tokens")
        p = summary.provenance or {}
        if p.get("window_length"):
            why = p.get("window_from", "model.max_length")
            click.echo(f"  windows of {p['window_length']} tokens ({why}" +
                       ("" if why == "model.max_length" else "; model.max_length sets another") + ")")
        for table, n in sorted(t["rows"].items()):
            click.echo(f"  {table:<11} {n:>10,} rows")
        if t["empty_documents"]:
            click.echo(f"note: {t['empty_documents']} empty documents have a documents row only", err=True)


@cli.command()
@command_boundary
def recipes():
    """List the recipes with their parameters, from their own docstrings."""
    from .recipes import RECIPES

    for r in RECIPES.values():
        click.echo(click.style(f"{r.name}", bold=True) + f"  -> table '{r.table}', version {r.version}")
        click.echo(textwrap.indent(r.doc, "    "))
        for name, field in r.params.model_fields.items():
            click.echo(f"    param {name} = {field.default!r}: {field.description}")
        click.echo()


@cli.command()
@click.argument("table", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the declared schema as JSON.")
@command_boundary
def schema(table, as_json):
    """Show the declared schema of TABLE (all tables without an argument)."""
    from .store.schema import load_schemas, table_schema

    chosen = [table_schema(table)] if table else list(load_schemas().values())
    # Attention values are declared as 'value': stored at the job's run.weight_dtype.
    stored = {"value": "float32*", "list<value>": "list<float32>*"}
    for s in chosen:
        if as_json:
            columns = [{**c, "type": stored[c["type"]].rstrip("*"), "weight_dtype": True} if c["type"] in stored
                       else c for c in s.columns]
            click.echo(json.dumps({"table": s.name, "version": s.version, "columns": columns}, indent=2))
            continue
        part = (", one folder per layer (layer-NNN), under encoder-self/, decoder-self/ and decoder-cross/ "
                "in encoder-decoder runs") if s.layer_folders else ""
        click.echo(click.style(f"{s.name}", bold=True) + f" (v{s.version}{part}): {s.description}")
        for c in s.columns:
            click.echo(f"    {c['name']:<14} {stored.get(c['type'], c['type']):<14} {c['description']}")
        click.echo()
    if not as_json and any(c["type"] in stored for s in chosen for c in s.columns):
        click.echo("* attention values: float32 (rounded to bfloat16 with the default run.weight_dtype, or "
                   "full float32); float16 with run.weight_dtype = float16")


@cli.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@command_boundary
def inspect(output, as_json):
    """Summarise an output directory: tables, row counts, layers, heads and provenance."""
    from .inspect import format_summary, summarize

    s = summarize(output)
    click.echo(json.dumps(s, indent=2, default=str) if as_json else format_summary(s))


@cli.command()
@click.argument("output")
@command_boundary
def verify(output):
    """Check every committed file of OUTPUT against its commit record (presence, size, sha256,
    rows, schema) and list files no record accounts for. Exits 1 on any mismatch."""
    from .store.verify import verify as run_verify

    report = run_verify(output)
    for line in report.problems:
        click.echo(f"damaged: {line}")
    for line in report.strays:
        click.echo(f"stray:   {line}")
    click.echo(f"{output}: {report.checked} committed files checked, {len(report.problems)} damaged, "
               f"{len(report.strays)} stray")
    if not report.ok:
        raise SystemExit(1)


@cli.command()
@click.argument("output")
@click.argument("table", required=False)
@command_boundary
def files(output, table):
    """Print the committed files of OUTPUT (of TABLE only, if given), one path per line: the
    way for outside readers to see committed data only, e.g. DuckDB's read_parquet([...])."""
    from .store import committed_files, read_records
    from .store.dataset import check_format
    from .store.schema import table_schema

    check_format(output)
    if table:
        table_schema(table)
    if not read_records(output):
        raise OutputError(f"{output} has no commit records: not an attnpipe output, or nothing committed yet")
    for path in committed_files(output, table):
        click.echo(str(path))


@cli.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for schedulers.")
@command_boundary
def status(output, as_json):
    """Where OUTPUT stands: shards committed, failed (with their error) and pending, whether a
    run holds its lock now, rows per table, documents and tokens, the last run and its
    throughput; later versions (OUTPUT/v2, ...) are listed. Read from the plan and the records
    only (no data file is opened; 'attnpipe verify' checks the files).

    \b
    Exit codes:
      0  complete: every planned shard committed, none failed
      3  not complete: pending or failed shards (or a run still starting)
      1  error: not an attnpipe output, storage format 1, an unreadable record
    """
    from .store.status import format_status
    from .store.status import status as read_status

    s = read_status(output)
    click.echo(json.dumps(s, indent=2, default=str) if as_json else format_status(s))
    if s["exit_code"]:
        raise SystemExit(s["exit_code"])


# --- the read side: query, heads, plot, report (pipeline/read; never imports torch) -------------

def _out_option(help_text: str):
    return click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), help=help_text)


def _open_read(output, out_file=None):
    """open_dataset for the read commands: -o refused inside the dataset, and every committed
    file checked against its record (size; sha256 within a budget) before anything reads it."""
    from .read import open_dataset
    from .read.output import refuse_inside
    from .store.verify import check_committed

    refuse_inside(out_file, output)
    ds = open_dataset(output)
    try:
        refuse_inside(out_file, ds.path)  # a URL's local mirror too
        check_committed(ds.path, ds.records)
    except BaseException:
        ds.close()
        raise
    return ds


@cli.command()
@click.argument("output")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True, help="Aligned table for people; CSV, JSON (an array of rows) or Parquet for programs.")
@_out_option("Write the result to FILE instead of stdout (required for --format parquet).")
@click.option("--max-rows", type=click.IntRange(min=0), default=100, show_default=True,
              help="Rows shown by --format table (0: all); the other formats write every row.")
@click.option("--max-width", type=click.IntRange(min=0), default=40, show_default=True,
              help="Longest text cell of --format table before it is cut with '…' (0: never cut).")
@command_boundary
def query(output, sql, fmt, out_file, max_rows, max_width):
    """Run one read-only SQL statement (DuckDB) over the committed tables of OUTPUT.

    Views: documents, tokens, words, head_stats, edges, rollout, maps, and for generate runs
    generations and grounding (those the job wrote), and
    edges_tokens / rollout_tokens (edges and rollout with query_token and key_token). Only
    SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN run; writes, COPY, ATTACH, INSTALL/LOAD
    and reading any file but the committed ones are refused.

    Example: attnpipe query out/demo "SELECT key_token, weight FROM edges_tokens WHERE
    doc_id = 'demo-0001' AND layer = 5 AND head = -1 AND query_token = 'it' ORDER BY weight DESC"
    """
    show_notes(quiet=False)
    from .read.output import write_result

    with _open_read(output, out_file) as ds:
        reader = ds.query.fetch(ds.query.run(sql), "reader")
        rows = write_result(reader, fmt, out_file, max_rows, max_width)
    if out_file:
        click.echo(f"wrote {rows:,} rows to {out_file}", err=True)


@cli.command()
@click.argument("output")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="Aligned table (mean±std) for people; CSV or JSON with every mean and std column.")
@_out_option("Write to FILE instead of stdout.")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="TOML or JSON file of label thresholds (positional, fixed_token, punctuation, special, "
                   "broad_entropy, local_distance, focused_entropy); unset keys keep their defaults.")
@command_boundary
def heads(output, fmt, out_file, rules_file):
    """The head atlas of OUTPUT: one row per (layer, head), head_stats averaged over windows (each
    window weighted equally) with its standard deviation, and a label per head (previous, next,
    self, first-token, separator, punctuation, special, broad, local, focused or mixed) from
    documented thresholds on normalised entropy and attention mass."""
    show_notes(quiet=False)
    import pyarrow as pa

    from .read.heads import display_frame, head_atlas, load_rules
    from .read.output import write_result
    from .read.query import reader_of

    rules = load_rules(rules_file)
    with _open_read(output, out_file) as ds:
        atlas = head_atlas(ds, rules)
    frame = display_frame(atlas) if fmt == "table" else atlas
    write_result(reader_of(pa.Table.from_pandas(frame, preserve_index=False)), fmt, out_file, max_rows=0)


def _span(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    start, sep, end = value.partition(":")
    try:
        return int(start or 0), int(end) if end else 1 << 30
    except ValueError:
        raise click.BadParameter(f"{value!r}: give START:END token positions, e.g. 0:40", param_hint="--span") from None


@cli.command()
@click.argument("output")
@_out_option("Image to write: FILE.png or FILE.svg.")
@click.option("--doc", "doc_id", help="Document id (heatmap and --rollout).")
@click.option("--layer", type=int, help="Layer of the heatmap (0-based).")
@click.option("--head", help="Head of the heatmap: a number, or 'mean' for the mean over heads.")
@click.option("--window", "window_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Window of a long document.")
@click.option("--grid", "grid_stat", help="Instead of a heatmap: a layers x heads grid of one head_stats "
                                           "statistic (e.g. entropy_norm, first_mass, prev_mass), annotated with labels.")
@click.option("--rollout", "rollout_token",
              help="Instead of a heatmap: what this token (a position or a token string) attends to after "
                   "rollout, layer by layer.")
@click.option("--span", help="Crop to token positions START:END (e.g. 0:40) of the window.")
@click.option("--words", is_flag=True, help="Merge subword tokens into words through their character offsets "
                                             "(sum over the attended word's pieces, mean over the attending word's).")
@click.option("--recipe", help="For heatmaps from edges: the recipe to draw (topk, threshold, topp); "
                               "default: the one with most rows.")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="Label thresholds for --grid (TOML or JSON, as for 'attnpipe heads').")
@click.option("--site", type=click.Choice(["encoder-self", "decoder-self", "decoder-cross"]),
              help="Encoder-decoder pair runs: which attention to draw (decoder-cross: target x source "
                   "tokens); default encoder-self.")
@command_boundary
def plot(output, out_file, doc_id, layer, head, window_index, grid_stat, rollout_token, span, words, recipe,
         rules_file, site):
    """Draw OUTPUT's attention as PNG or SVG: a heatmap of one document, layer and head labelled
    with its tokens (from maps, or from edges as a sparse view when no dense map was stored);
    with --grid a layers x heads grid of a statistic; with --rollout a rollout view."""
    show_notes(quiet=False)
    from .read import plots
    from .read.heads import head_atlas, load_rules
    from .read.matrices import attention_matrix, crop, merge_words, parse_head, rollout_matrix, window_tokens

    if not out_file:
        raise click.UsageError("give the image to write with -o FILE.png or FILE.svg")
    plots.image_format(out_file)
    cropped = _span(span)
    with _open_read(output, out_file) as ds:
        if grid_stat:
            fig = plots.grid_figure(head_atlas(ds, load_rules(rules_file)), grid_stat)
        else:
            if not doc_id:
                raise click.UsageError("give --doc ID (with --layer and --head, or --rollout TOKEN), or --grid STAT")
            if rollout_token is not None:
                m, tokens = rollout_matrix(ds, doc_id, rollout_token, window_index)
                rows = False
            else:
                if layer is None or head is None:
                    raise click.UsageError("a heatmap needs --layer L and --head H (a number or 'mean')")
                m = attention_matrix(ds, doc_id, layer, parse_head(head), window_index, recipe, site)
                tokens, rows = window_tokens(ds, doc_id, window_index, m.row_name.split()[0] if ds.pairs else "source"), True
                if words and ds.pairs and m.row_name != m.col_name:
                    raise click.UsageError("--words merges one side's tokens; a cross-attention heatmap has two")
            if cropped:
                m = crop(m, *cropped, rows=rows)
                tokens = tokens.iloc[cropped[0]:cropped[1]]
            if words:
                m = merge_words(m, tokens, rows=rows)
            fig = plots.matrix_figure(m)
        plots.save(fig, out_file)
    click.echo(f"wrote {out_file}", err=True)


@cli.command()
@click.argument("output")
@_out_option("The HTML file to write (one self-contained file; opens offline).")
@click.option("--doc", "doc_ids", multiple=True, help="A document for the heatmaps and the head view "
                                                       "(repeat for several); default: a few short ones.")
@click.option("--docs", "count", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many documents to show when --doc is not given.")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False),
              help="Label thresholds for the head atlas (TOML or JSON, as for 'attnpipe heads').")
@command_boundary
def report(output, out_file, doc_ids, count, rules_file):
    """Write one self-contained HTML report of OUTPUT: provenance and table sizes, the head atlas
    and its grids, heatmaps of a few documents, and an interactive head view (pick a layer and a
    head, point at a token to see what it attends to). No network is needed to open it."""
    show_notes(quiet=False)
    from .read.heads import load_rules
    from .read.report import write_report

    if not out_file:
        raise click.UsageError("give the file to write with -o FILE.html")
    with _open_read(output, out_file) as ds:
        path = write_report(ds, out_file, list(doc_ids) or None, count, load_rules(rules_file))
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", err=True)


# --- studies of a finished dataset (pipeline/studies; never imports torch) -----------------------

@cli.group()
def study():
    """Studies of finished datasets, written into a folder of their own: grounding, bias."""


@study.command("grounding")
@click.argument("output")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False),
              help="CSV or JSON Lines of spans: doc_id, label (1/true/grounded or 0/false/ungrounded), and "
                   "optionally step_start/step_end or char_start/char_end. Trains and cross-validates a "
                   "detector; with --detector, evaluates that one instead.")
@click.option("--detector", "detector_file", type=click.Path(dir_okay=False),
              help="A detector.json of an earlier study: score OUTPUT's generations (or the --labels spans) with it.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the results (default: OUTPUT/_studies/grounding-train, -apply or -scores).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Cross-validation folds, stratified by label and grouped by doc_id.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds and the bootstrap.")
@click.option("--bootstrap", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Bootstrap resamples (of whole generations) for the AUROC's 95% interval.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Heads with the largest coefficients to list.")
@command_boundary
def study_grounding(output, labels_file, detector_file, out_dir, folds, seed, bootstrap, top):
    """Are OUTPUT's generations grounded in their context? From a generate run's grounding table:
    Lookback Lens features (each head's lookback ratio, averaged over a span), a logistic-regression
    detector of ungrounded spans with its cross-validated AUROC and bootstrap interval, the heads
    that carry the most weight, and label-free scores per generation (lookback ratio, AttnLogDet-style
    log diagonal, token log-probability and entropy). Without --labels or --detector: the label-free
    scores only."""
    show_notes(quiet=False)
    from pathlib import Path

    from .studies import results
    from .studies.grounding import StudyOptions, mode_of
    from .studies.grounding import study as run_study

    options = StudyOptions(folds=folds, seed=seed, bootstrap=bootstrap, top=top)
    out = results.check_out(out_dir or results.default_out(output, mode_of(labels_file, detector_file)), output)
    result = run_study(output, labels_file, detector_file, options, progress=click.echo)
    results.write(result, out, options)
    click.echo((Path(out) / "summary.txt").read_text(encoding="utf-8"), nl=False)


@study.command("bias")
@click.option("--a", "run_a", required=True, help="The first run (e.g. pro-stereotyped sentences), with a group_mass table.")
@click.option("--b", "run_b", required=True, help="The second run over the paired corpus (e.g. anti-stereotyped).")
@click.option("--from", "from_group", help="Group whose tokens attend (default: with two groups, the first by name).")
@click.option("--to", "to_group", help="Group attended to.")
@click.option("--pair-by", type=click.Choice(["corpus_row", "source_index", "doc_id"]), default="corpus_row",
              show_default=True, help="How documents of the two runs pair up (WinoBias: the line, corpus_row).")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the results (default: A/_studies/bias-<from>-<to>).")
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap and permutation draws.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="False discovery rate for calling a head's difference significant.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--check", "check_heads", type=click.IntRange(min=1),
              help="Run both corpora again with the N top heads' attention to the to-group removed, and as many "
                   "random heads (--random sets): does the output gap between A and B move more for the top heads?")
@click.option("--random", "random_sets", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random head sets for --check.")
@command_boundary
def study_bias(run_a, run_b, from_group, to_group, pair_by, out_dir, resamples, seed, alpha, top, check_heads,
               random_sets):
    """Attention between word groups in two runs over paired corpora (pro- vs anti-stereotyped): per
    layer and head, the mean paired difference of the from-group's attention mass on the to-group,
    its bootstrap interval, a permutation p-value and Benjamini-Hochberg q-value over all heads; the
    heads that differ most; a layers x heads heatmap."""
    show_notes(quiet=False)
    from pathlib import Path

    from .studies import bias, results

    options = bias.BiasOptions(from_group, to_group, pair_by, resamples, seed, alpha, top)
    result = bias.study(run_a, run_b, options)
    default = Path(str(run_a).removeprefix("file://")) / results.STUDIES / f"bias-{result.from_group}-{result.to_group}"
    out = results.check_out(out_dir or default, run_a)
    results.check_out(out, run_b)
    checked = None
    if check_heads:
        from .studies import bias_check

        checked = bias_check.check(run_a, run_b, result.heads, result.to_group, check_heads, random_sets, seed,
                                   int(result.provenance["num_layers"]), int(result.provenance["num_heads"]),
                                   progress=click.echo)
    bias.write(result, out, options, checked)
    click.echo((Path(out) / "summary.txt").read_text(encoding="utf-8"), nl=False)


def _from_here(path: str | None) -> str | None:
    """A local path given on the command line, made absolute (the job resolves relative ones
    against its own folder); URLs, globs and hub names as given."""
    if path is None or "://" in path:
        return path
    from pathlib import Path

    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() or any(c in path for c in "*?[") else path


# --- distillation: teacher vs student (pipeline/studies/distill.py, export_distill.py) --------

@study.command("distill")
@click.option("--teacher", required=True, help="Output folder of the teacher's run.")
@click.option("--student", required=True, help="Output folder of the student's run over the same corpus.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the results (default: STUDENT/_studies/distill-<teacher folder name>).")
@click.option("--metric", type=click.Choice(["kl", "js"]), default="kl", show_default=True,
              help="The divergence the best layer mappings minimize.")
@click.option("--sample", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows on which top-k edges are checked against dense maps (runs with both).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that sample.")
@command_boundary
def study_distill(teacher, student, out_dir, metric, sample, seed):
    """How close is a student's attention to its teacher's? For every (teacher layer, student
    layer): KL and Jensen-Shannon divergence of the attention rows, per head (equal head counts)
    and of the head means; each student layer's closest teacher layer, the best increasing
    mapping, and TinyBERT's uniform mapping beside them. Different tokenizers are compared on
    the character spans both share. Exact from dense maps; from top-k edges an approximation,
    whose error is measured on a sample when both runs have both."""
    show_notes(quiet=False)
    from pathlib import Path

    from .studies import distill_results, results
    from .studies.distill import DistillOptions
    from .studies.distill import study as run_study

    options = DistillOptions(metric=metric, sample=sample, seed=seed)
    out = results.check_out(out_dir or distill_results.default_out(teacher, student), student)
    results.check_out(out, teacher)
    result = run_study(teacher, student, options, progress=click.echo)
    distill_results.write(result, out, options)
    click.echo((Path(out) / "summary.txt").read_text(encoding="utf-8"), nl=False)


# --- head scan: one intervention per head (pipeline/control/heads.py, studies/heads.py) -----

@study.command("heads")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--job", "job_file", required=True, type=click.Path(dir_okay=False),
              help="A job with [[interventions]]: the template's op and keys are applied to each head alone.")
@click.option("--target", type=click.Choice(["cosine", "kl_mean", "kl_last", "logit_diff"]), default="cosine",
              show_default=True, help="The effect heads are ranked by: 1 - cosine of the pooled embeddings, "
                                      "next-token KL, or the change of the targets' logit difference.")
@click.option("--intervention", "index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which [[interventions]] entry of the job is the template.")
@click.option("--sample", type=click.IntRange(min=1), default=64, show_default=True,
              help="The first N documents of the job's corpus.")
@click.option("--corpus", "corpus_path", help="corpus.path of the job (e.g. another copy of WinoBias).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Heads listed, and steered together in a second run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@command_boundary
def study_heads(out, job_file, target, index, sample, corpus_path, top, quiet):
    """Rank attention heads by the effect of steering each alone (PASTA's head search; the
    causal-mediation head scan). Runs the job's template intervention once per head on a sample
    (OUT/scan), ranks the heads by --target, then steers the top heads together (OUT/top); writes
    OUT/ranking-<target>.csv, summary-<target>.txt and top_heads-<target>.toml."""
    show_notes(quiet=False)
    from pathlib import Path

    from .control import heads as scan
    from .job import load_job
    from .runtime import quiet_libraries
    from .studies import heads as study

    quiet_libraries()

    job = load_job(job_file, overrides={"corpus.path": _from_here(corpus_path), "run.progress": not quiet})
    study.check_target(target, job.effects.logits, job.effects.targets)
    out = Path(out)
    ranking = study.rank(study.effects_of(scan.run_scan(scan.scan_job(job, index, sample, out / "scan", job_file),
                                                        quiet)), target)
    pairs = [(int(r.layer), int(r.head)) for r in ranking.table.head(top).itertuples()]
    combined = study.effects_of(scan.run_scan(scan.combined_job(job, index, pairs, sample, out / "top"), quiet))
    label = scan.template_of(job, index, job_file).label or f"interventions[{index}]"
    click.echo(study.write(ranking, out, top, combined, label), nl=False)


@cli.group()
def export():
    """Data for other programs, written from a finished dataset: distill (teacher targets)."""


@export.command("distill")
@click.argument("output")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False),
              help="Folder for targets.parquet (default: OUTPUT/_studies/distill-export-<format>[-k<k>]).")
@click.option("--format", "fmt", type=click.Choice(["dense", "sparse", "sampled"]), default="dense",
              show_default=True, help="dense: whole rows; sparse: top-k with the leftover mass; sampled: "
                                      "keys drawn from each row with importance weights.")
@click.option("--k", type=click.IntRange(min=1), default=8, show_default=True,
              help="sparse: keys kept per row; sampled: draws per row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled format's draws.")
@command_boundary
def export_distill(output, out_dir, fmt, k, seed):
    """OUTPUT's dense attention maps as teacher targets for distillation, one row per (window,
    layer, head, query), in Parquet that datasets.load_dataset("parquet") reads; with the
    truncation error per head of the sparse and sampled formats."""
    show_notes(quiet=False)
    from .studies import results
    from .studies.export_distill import ExportOptions, default_out
    from .studies.export_distill import export as run_export

    options = ExportOptions(format=fmt, k=k, seed=seed)
    out = results.check_out(out_dir or default_out(output, options), output)
    summary = run_export(output, out, options)
    click.echo(f"wrote {summary['rows']:,} rows ({fmt}) of {summary['windows']} windows to {out}")
    if "error" in summary:
        e = summary["error"]
        click.echo(f"{e['measure']}: mean {e['mean']:.5f}, worst head L{e['worst_head']['layer']}H"
                   f"{e['worst_head']['head']} {e['max_head_mean']:.5f}")
    click.echo(f"load: {summary['load']}")


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        click.echo(f"{kind}: {record.getMessage()}", err=True)


def show_notes(quiet: bool) -> None:
    """The library's notes and warnings (logger 'attnpipe') go to stderr as one line each."""
    log = logging.getLogger("attnpipe")
    log.handlers[:] = [_NoteHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main() -> None:
    """The `attnpipe` command. Once it is done the process leaves through `leave`."""
    try:
        cli(prog_name="attnpipe")
        code = 0
    except SystemExit as exc:  # click ends every command this way, errors included
        code = exc.code
    leave(code)


def leave(code) -> None:
    """End the process as `sys.exit(code)` would, less the interpreter's teardown: other threads
    joined, atexit handlers run, streams flushed, then os._exit. Collecting torch's and
    transformers' module objects one by one took 1.4-1.7 s of a 2-core CPU after every command
    that loaded them (benchmarks/RESULTS-extract.md); everything attnpipe writes is closed and
    fsynced before this point."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a broken pipe
                pass
        os._exit(code & 0xFF)


if __name__ == "__main__":
    sys.exit(main())
