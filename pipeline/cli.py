"""The `attnpipe` command line. Library errors become one-line messages (exit 1) here and only
here; `--debug` shows the traceback instead."""

from __future__ import annotations

import functools
import json
import logging
import sys
import textwrap

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
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N documents (corpus.limit).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (run.device).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="model.dtype.")
@click.option("--model", "model_name", help="Model directory or hub name (model.name).")
@click.option("--num-shards", type=click.IntRange(min=1), help="run.num_shards.")
@click.option("--batch-tokens", type=click.IntRange(min=1), help="run.batch_tokens.")
@click.option("--new-run", is_flag=True,
              help="Start a new version (OUTPUT/v2, v3, ...) beside the old data, after the job, the "
                   "corpus or the model changed. Rerun without it to resume that version.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@command_boundary
def run(job_file, output, limit, device, dtype, model_name, num_shards, batch_tokens, new_run, quiet):
    """Run JOB_FILE (TOML): corpus -> model -> recipes -> Parquet tables. Each shard is committed
    on its own; a rerun of the same job skips committed shards."""
    from .job import load_job

    # The job file is checked before torch, datasets or the model are imported.
    job = load_job(job_file, overrides={
        "run.output": output, "corpus.limit": limit, "run.device": device, "model.dtype": dtype,
        "model.name": model_name, "run.num_shards": num_shards, "run.batch_tokens": batch_tokens})
    show_notes(quiet)
    quiet_libraries()
    from .executor.local import run_job

    summary = run_job(job, quiet=quiet, new_run=new_run)
    if not quiet:
        t = summary.totals
        skipped = f", {len(summary.shards_skipped)} already committed" if summary.shards_skipped else ""
        click.echo(f"wrote {summary.output}: {len(summary.shards_run)} shards run{skipped}; "
                   f"{t['documents']} documents ({t['empty_documents']} empty), {t['windows']} windows, "
                   f"{t['tokens']} tokens")
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
    for s in chosen:
        if as_json:
            click.echo(json.dumps({"table": s.name, "version": s.version, "columns": list(s.columns)}, indent=2))
            continue
        part = ", one folder per layer (layer-NNN)" if s.layer_folders else ""
        click.echo(click.style(f"{s.name}", bold=True) + f" (v{s.version}{part}): {s.description}")
        for c in s.columns:
            click.echo(f"    {c['name']:<14} {c['type']:<14} {c['description']}")
        click.echo()


@cli.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@command_boundary
def inspect(output, as_json):
    """Summarise an output directory: tables, row counts, layers, heads and provenance."""
    from .inspect import format_summary, summarize

    s = summarize(output)
    click.echo(json.dumps(s, indent=2, default=str) if as_json else format_summary(s))


@cli.command()
@click.argument("output", type=click.Path(file_okay=False))
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
@click.argument("output", type=click.Path(file_okay=False))
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


def quiet_libraries() -> None:
    """Our own progress bar is the progress: hide datasets' and transformers' load bars."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main() -> None:
    cli(prog_name="attnpipe")


if __name__ == "__main__":
    sys.exit(main())
