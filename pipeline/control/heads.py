"""The head scan (PASTA's head search; the causal-mediation head scan of Vig et al. 2020): one
intervention per attention head, each applied alone, on a sample of the corpus, through the same
job API as `attnpipe run`. The ranking itself is a study of the resulting effects table
(pipeline/studies/heads.py), which never touches the model.

The template is one [[interventions]] entry of a job: its op and keys are kept, and its layers
and heads (default every one) say which heads are scanned, each becoming an intervention of its
own labelled "L<layer>.H<head>". The job's corpus, model and recipes are kept; the sample is its
first `sample` documents.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import JobError
from ..job import InterventionSpec, JobSpec


def head_label(layer: int, head: int) -> str:
    """The label of the intervention on one head: the one place it is spelled."""
    return f"L{layer}.H{head}"


def model_shape(job: JobSpec) -> tuple[int, int]:
    """(layers, heads) from the model's config, without loading its weights."""
    from transformers import AutoConfig

    from ..hub import honour_offline
    from ..model import resolve_source

    source, _ = resolve_source(job.model.name, Path(job.base_dir))
    with honour_offline():
        config = AutoConfig.from_pretrained(source, revision=job.model.revision)
    return config.num_hidden_layers, config.num_attention_heads


def scanned_heads(template: InterventionSpec, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """The (layer, head) pairs the template covers."""
    if template.layer_heads is not None:
        return [(layer, head) for layer, head in template.layer_heads]
    layers = range(shape[0]) if template.layers == "all" else template.layers
    heads = range(shape[1]) if template.heads == "all" else template.heads
    return [(layer, head) for layer in layers for head in heads]


def one_per_head(template: InterventionSpec, pairs: list[tuple[int, int]]) -> list[dict]:
    """The template once per head, as [[interventions]] entries."""
    base = template.model_dump(exclude={"label", "layers", "heads", "layer_heads"}, exclude_none=True)
    return [{**base, "label": head_label(layer, head), "layer_heads": [[layer, head]]} for layer, head in pairs]


def template_of(job: JobSpec, index: int, source: str) -> InterventionSpec:
    if not job.interventions:
        raise JobError(f"{source}: the head scan needs one [[interventions]] entry as its template (op and keys); "
                       "the job has none")
    if not 0 <= index < len(job.interventions):
        raise JobError(f"--intervention {index}: the job has {len(job.interventions)} [[interventions]] "
                       f"(0..{len(job.interventions) - 1})")
    return job.interventions[index]


def scan_job(job: JobSpec, index: int, sample: int | None, output: Path, source: str = "job") -> JobSpec:
    """The scan as a job: one intervention per head of the template, the first `sample` documents."""
    template = template_of(job, index, source)
    interventions = one_per_head(template, scanned_heads(template, model_shape(job)))
    return _variant(job, interventions, sample, output, f"{job.name}-heads")


def combined_job(job: JobSpec, index: int, pairs: list[tuple[int, int]], sample: int | None,
                 output: Path) -> JobSpec:
    """The template on the given heads together (the scan's top heads), on the same sample."""
    template = template_of(job, index, "job")
    base = template.model_dump(exclude={"label", "layers", "heads", "layer_heads"}, exclude_none=True)
    spec = {**base, "label": f"top{len(pairs)}", "layer_heads": [[layer, head] for layer, head in pairs]}
    return _variant(job, [spec], sample, output, f"{job.name}-top")


def _variant(job: JobSpec, interventions: list[dict], sample: int | None, output: Path, name: str) -> JobSpec:
    from ..job import build_job

    data = job.model_dump(exclude={"base_dir"}, exclude_none=True)
    data.update(name=name, interventions=interventions)
    data["run"]["output"] = str(output)
    if sample is not None:
        data["corpus"]["limit"] = sample
    return build_job(data, source=f"{name} (from {job.name})", base_dir=job.base_dir)


def run_scan(job: JobSpec, quiet: bool = False):
    """Run a scan (or combined) job through the job API; returns its dataset."""
    from .. import api

    return api.run(job, quiet=quiet)
