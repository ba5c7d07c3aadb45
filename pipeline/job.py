"""Job specs: a TOML file with [corpus], [model], [run] and a list of [[recipes]].

Everything is validated before any work starts. Relative corpus and model paths are resolved
against the job file's folder (so a job runs the same from any working directory); the output
directory is relative to where you run `attnpipe`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .errors import JobError
from .groups import GroupSpec
from .hub import is_local_only
from .recipes import RECIPES, recipe_id, validate_recipe
from .store.paths import FORMAT_VERSION
from .store.schema import SCHEMA_VERSION, load_schemas

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a job name is a folder name under out/
MAX_SHARDS = 100_000
LEASE_RANGE = (10.0, 86_400.0)  # run.lock_lease, seconds


class _Section(BaseModel):
    # strict: TOML is typed, so "8192" (a string) for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class CorpusSpec(_Section):
    path: str
    format: Literal["auto", "text", "json", "csv", "parquet", "disk", "hub"] = "auto"
    # What one document is in text files: a whole file, a paragraph (lines up to one or more
    # blank lines) or a line. Default: "file" for a folder or glob (people who point a corpus at a
    # folder of .txt files mean one document per file), "line" for a single .txt file.
    text_unit: Literal["file", "paragraph", "line"] | None = None
    split: str = "train"
    text_column: str = "text"
    # Encoder-decoder models: the column of each document's target text. The decoder then runs
    # teacher-forced over it, and its self- and cross-attention are captured (pipeline/pairs.py).
    target_column: str | None = None
    # Generate runs ([generate]): the column of each document's context, which generate.template
    # places in the prompt as {context}; its tokens are the `context` segment that the grounding
    # table's lookback ratios measure attention on.
    context_column: str | None = None
    # Spans marked in the text with [brackets] (WinoBias: "[The developer] argued with ..."): the
    # brackets are removed before the model reads the text; [[groups]] with marked = true use them.
    marks: Literal["none", "brackets"] = "none"
    # A regular expression whose matches are removed from every text before anything else
    # (WinoBias's line numbers: "^\\d+ "). Token offsets point into the text without them.
    strip: str | None = None
    id_column: str | None = None
    metadata_columns: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.strip():  # "" would read the job file's own folder
            raise ValueError("must name a file, folder, glob or hub dataset, not an empty path")
        return value


class AttentionModuleSpec(_Section):
    # Modules of a factory's model that compute attention, by qualified name; `*` stands for one
    # part of the name (blocks.*.attn matches blocks.0.attn, not blocks.0.mlp.attn).
    pattern: str
    # Where each such module's (batch, head, query_pos, key_pos) probabilities are after its
    # forward: output[1] (it returns (output, weights)), output.attn_weights, output["weights"],
    # or module.last_weights (it keeps them in an attribute).
    weights: str

    def path(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """The weights path parsed: ("output", (("item", 1),)); see pipeline/capture/modules.py."""
        return parse_weights_path(self.weights)


class ModelSpec(_Section):
    # A local directory, a hub name, or the embedded default "all-MiniLM-L6-v2".
    name: str = "all-MiniLM-L6-v2"
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Window length in tokens; default: the model's own maximum. Longer documents are windowed.
    max_length: int | None = Field(default=None, ge=4)
    # Tokens shared by consecutive windows, so every token sees some context on both sides.
    stride: int = Field(default=32, ge=0)
    trust_remote_code: bool = False
    # Pickle checkpoints (.bin) can run code when loaded: only safetensors unless asked for.
    allow_pickle: bool = False
    # "package.module:function" returning (model, tokenizer): any torch model (README, "Models
    # that are not transformers models"). It runs the job's Python code, so only with allow_code.
    factory: str | None = None
    allow_code: bool = False
    attention_modules: list[AttentionModuleSpec] = Field(default_factory=list)


class RunSpec(_Section):
    output: str | None = None
    # At most MAX_SHARDS: every shard is a commit record and files per table, which status,
    # verify and reruns read; shards past the corpus rows would be empty and are never planned.
    num_shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    # Padded tokens per forward pass (batch x longest window). 8192 keeps a 6-layer, 12-head
    # float32 model under ~1 GiB of attention maps per layer on CPU or GPU.
    batch_tokens: int = Field(default=8192, ge=1)
    device: str = "auto"
    # How each layer is computed (see pipeline/capture): eager (the model's own attention; its
    # probabilities feed the recipes), sdpa (torch's fused attention; probabilities recomputed
    # once per layer when needed), fused (sdpa + Triton kernels on q and k, P never stored).
    # auto = fused on CUDA with triton, sdpa elsewhere (on a CPU, probabilities a few windows at a time).
    attention: Literal["auto", "eager", "sdpa", "fused"] = "auto"
    progress: bool = True
    # Storage precision of attention values (weights, maps, head statistics). bfloat16: float32
    # columns holding values rounded to 8 significant bits (relative error <= 2^-8, 0.4%), which
    # byte-stream-split and zstd shrink to 247 bytes per token for the default recipes on the demo
    # corpus; float16: 3 digits, 361 bytes per token, a float16 column; float32: as computed, 719.
    weight_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Rows wait in memory before they are written; this caps them, whatever the shard's size.
    buffer_mb: int = Field(default=64, ge=1)
    # A lock not renewed for this many seconds belongs to a dead run (on another host) and is
    # taken over; the holder renews it every lease/4 seconds. At least 10 s: a live run that
    # pauses longer than the lease (swap, a busy network filesystem, a suspended laptop) loses
    # its lock to a second run and both fail. At most a day: a run killed on another host blocks
    # the output for the whole lease.
    lock_lease: float = Field(default=900.0, ge=LEASE_RANGE[0], le=LEASE_RANGE[1])
    # Where shards run: in this process, or as tasks on Dask (a local cluster of `workers`
    # processes, one per GPU with dask-cuda, or the cluster whose scheduler is `scheduler`).
    executor: Literal["local", "dask"] = "local"
    workers: int | None = Field(default=None, ge=1)
    scheduler: str | None = None
    # Attempts after the first for a shard that raised; a shard that still fails is recorded
    # in _failures/ and the job exits non-zero once the other shards are done.
    retries: int = Field(default=2, ge=0)

    @field_validator("output")
    @classmethod
    def _output(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # "" would silently mean out/<name>
            raise ValueError("must name a folder or URL, not an empty path (leave run.output out for out/<name>)")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        ok = value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
        if not ok:
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps (got {value!r})")
        return value


class GenerateSpec(_Section):
    """[generate]: decoder models write what they generate for each document's prompt, and the
    attention of every decoding step (pipeline/generate)."""

    # The user message: the corpus text as {text}, the context column's as {context}; without a
    # template the text alone. Literal braces are doubled ({{ }}).
    template: str | None = None
    # A system message, placed by the chat template (or before the prompt without one).
    system: str | None = None
    # The tokenizer's chat template: used when it has one unless set to false.
    chat_template: bool = True
    max_new_tokens: int = Field(default=64, ge=1)
    # End-of-sequence tokens are not drawn before this many tokens (fixed-length runs, benchmarks).
    min_new_tokens: int = Field(default=0, ge=0)
    # Greedy by default; sample = true draws from softmax(logits / temperature), restricted to the
    # top_k tokens (0: all) and the top_p nucleus, with a generator seeded per document from `seed`
    # and its doc_id, so a document's text does not depend on the batch it ran in.
    sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    # Generation ends at an end-of-sequence token, at a stop string (kept in the text), or after
    # max_new_tokens.
    stop: list[str] = Field(default_factory=list)
    # Documents generated together (left-padded, one KV cache).
    batch_size: int = Field(default=8, ge=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class KeysSpec(_Section):
    """Which keys an intervention acts on; exactly one way per selection (pipeline/control/keys.py)."""

    # Token positions within each window (0 = the first token, special tokens included).
    positions: list[int] | None = None
    # Character [start, end) spans of the document text: the tokens they overlap.
    spans: list[list[int]] | None = None
    # A regular expression on the document text: the tokens its matches overlap.
    regex: str | None = None
    # Tokens of one kind: special (CLS, SEP, BOS ...), sep, punct.
    segment: str | None = None
    # A metadata column holding each document's character spans: one [start, end) pair or a list of them.
    column: str | None = None
    # The tokens of a [[groups]] entry, by its name (words, word files, a regex or marked spans).
    group: str | None = None


class InterventionSpec(_Section):
    """[[interventions]]: an edit of attention in chosen layers and heads (pipeline/control).

    Before the softmax: scale adds log(alpha) to the chosen keys' scores (PASTA: except_keys =
    the emphasised span, alpha = 0.01), zero removes them (-inf), bias adds `value`. After the
    softmax: patch replaces each chosen head's pattern by the one the same head computes on the
    document's paired text (the metadata column `patch_from`; Vig et al. 2020)."""

    label: str | None = None
    op: Literal["scale", "zero", "bias", "patch"]
    layers: list[int] | Literal["all"] = "all"
    heads: list[int] | Literal["all"] = "all"
    # Instead of layers x heads: chosen heads of chosen layers, as [layer, head] pairs (the top
    # heads of `attnpipe study heads`).
    layer_heads: list[list[int]] | None = None
    keys: KeysSpec | None = None
    except_keys: KeysSpec | None = None
    alpha: float = Field(default=0.01, gt=0.0)  # PASTA's default; scores + log(alpha)
    value: float | None = None  # bias: added to the chosen keys' scores
    patch_from: str | None = None  # patch: metadata column with each document's paired text


class EffectsSpec(_Section):
    """[effects]: what is measured for every intervention against the unedited pass."""

    # Load a decoder's language-model head, so that next-token KL and logit differences are
    # recorded (cosine of the pooled embedding is recorded for every model).
    logits: bool = False
    # Two tokens (each one token of the vocabulary): logit(first) - logit(second) at each
    # window's last real token, with and without the intervention. Needs logits = true.
    targets: list[str] = Field(default_factory=list)


class JobSpec(_Section):
    name: str = "job"
    description: str = ""
    corpus: CorpusSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    generate: GenerateSpec | None = None
    # Named groups of words (word lists, files, regexes, marked spans) for the groups recipe:
    # attention mass between groups (pipeline/groups.py).
    groups: list[GroupSpec] = Field(default_factory=list)
    interventions: list[InterventionSpec] = Field(default_factory=list)
    effects: EffectsSpec = Field(default_factory=EffectsSpec)
    # The default recipe set: head statistics, the 8 strongest keys of each query on the head
    # mean, and rollout's 8 strongest keys: about 210 bytes per token at the default precision.
    recipes: list[dict[str, Any]] = Field(default_factory=lambda: [
        {"name": "head_stats"}, {"name": "topk", "k": 8, "per_head": False}, {"name": "rollout", "k": 8}])
    # Set by load_job, not by the user: where relative corpus/model paths are resolved from.
    base_dir: str = "."

    def output_dir(self) -> Path | str:
        """The output folder: a local path, or an fsspec URL (s3://bucket/attn, memory://x) as given."""
        out = self.run.output or f"out/{self.name}"
        return out if "://" in out and not out.startswith("file://") else Path(out.removeprefix("file://"))

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def fingerprint_parts(self) -> dict[str, Any]:
        """What the output depends on, not where its inputs live: moving the project or copying
        the corpus or model elsewhere keeps the fingerprint. A local corpus is identified by its
        documents (each committed shard's fingerprint of its doc ids and texts, checked on every
        rerun), a local model by its weights' sha256 (checked the same way), so their paths are
        left out; so is `corpus.limit`, since a larger limit only appends rows (a smaller one is
        refused by the plan). Not the name, output folder, device, batch size or progress."""
        # jobs without them keep their fingerprints
        unset = {k for k in ("target_column", "context_column", "strip") if getattr(self.corpus, k) is None}
        unset |= {"marks"} if self.corpus.marks == "none" else set()
        corpus = self.corpus.model_dump(exclude={"limit"} | unset)
        if self.corpus.format != "hub" and (is_local_only(self.corpus.path, Path(self.base_dir))
                                            or self.resolve(self.corpus.path).exists()):
            corpus["path"] = "(local)"
            if corpus.get("text_unit") is None:  # the default spelled out is the same job
                pattern = any(ch in self.corpus.path for ch in "*?[")
                corpus["text_unit"] = "file" if pattern or self.resolve(self.corpus.path).is_dir() else "line"
        model = self.model.model_dump()
        if self.resolve(self.model.name).exists():
            model["name"] = "(local folder)"
        parts = {"corpus": corpus, "model": model,
                "run": {"num_shards": self.run.num_shards, "weight_dtype": self.run.weight_dtype},
                "recipes": [{**r, "version": RECIPES[r["name"]].version} for r in self.recipes],
                "versions": {"attnpipe": __version__, "format": FORMAT_VERSION, "schema": SCHEMA_VERSION}}
        if self.generate is not None:  # jobs without one keep their fingerprint
            parts["generate"] = self.generate.model_dump(exclude={"batch_size"})
        if self.groups:
            parts["groups"] = [g.model_dump() for g in self.groups]
        if self.interventions:  # jobs without them keep their fingerprint
            parts["interventions"] = [i.model_dump() for i in self.interventions]
            parts["effects"] = self.effects.model_dump()
        return parts

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_parts(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_diff(old: Any, new: Any, name: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two fingerprint_parts(); lists of
    the same length (recipes) are compared item by item, as recipes[1].k."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [c for k in keys for c in fingerprint_diff(old.get(k), new.get(k), f"{name}.{k}" if name else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in fingerprint_diff(a, b, f"{name}[{i}]")]
    if old != new:
        return [f"{name}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]
    return []


def _format_error(source: str, err: dict) -> str:
    loc = list(err["loc"])
    if loc and loc[0] in ("recipes", "interventions") and len(loc) > 1 and isinstance(loc[1], int):
        where = f"{loc[0]}[{loc[1]}]" + "".join(f".{p}" for p in loc[2:])
    else:
        where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_model(loc[:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        return f"{source}: unknown key '{where}'; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{where}'"
    got = err.get("input")
    return f"{source}: '{where}': {err['msg']} (got {got!r})"


def _section_model(loc: list) -> type[BaseModel] | None:
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = model.model_fields.get(str(part))
        ann = _section_of(getattr(field, "annotation", None))
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _section_of(ann: Any) -> Any:
    """The section class inside list[X] or X | None annotations (else the annotation)."""
    for arg in getattr(ann, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return ann


def _set_override(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def build_job(data: dict, source: str = "job", base_dir: str | Path = ".",
              overrides: dict[str, Any] | None = None) -> JobSpec:
    """Validate a job from a dict (a parsed TOML file) plus dotted-key overrides."""
    _check_values(data, source)
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_override(data, dotted, value)
    data["base_dir"] = str(base_dir)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(_format_error(source, exc.errors()[0])) from None
    if not NAME.match(job.name):
        raise JobError(f"{source}: 'name' {job.name!r} must be a plain folder name (letters, digits, "
                       "'.', '_', '-', not starting with '.' or '-'); it names the default output out/<name>")
    if not job.recipes:
        raise JobError(f"{source}: 'recipes' is empty; name at least one of: {', '.join(RECIPES)}")
    job.recipes = [validate_recipe(r, f"{source}: recipes[{i}]") for i, r in enumerate(job.recipes)]
    seen: dict[str, int] = {}
    for i, r in enumerate(job.recipes):
        first = seen.setdefault(recipe_id(r), i)
        if first != i:
            raise JobError(f"{source}: recipes[{i}] repeats recipes[{first}] ({recipe_id(r)}), which "
                           "would store every row twice; remove one or change its parameters")
    _check_metadata_columns(job.corpus, source)
    _check_generate(job, source)
    _check_groups(job, source)
    from .control.spec import check_interventions  # the rules live beside the code that applies them

    check_interventions(job, source)
    _check_factory(job.model, source)
    if job.model.max_length is not None and job.model.stride >= job.model.max_length - 2:
        raise JobError(f"{source}: 'model.stride' ({job.model.stride}) must be smaller than "
                       f"model.max_length - 2 ({job.model.max_length - 2})")
    return job


def _check_values(node: Any, source: str, where: str = "") -> None:
    """TOML dates and times, and inf or nan, are never valid job values (and would otherwise
    reach a traceback or an endless lease); refuse them with the key that holds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_values(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_values(value, source, f"{where}[{i}]")
    elif isinstance(node, (datetime.date, datetime.time)):  # datetime is a date
        raise JobError(f"{source}: '{where}': a TOML date or time ({node.isoformat()}) is not valid here; "
                       "quote it if you meant a string, or give a number")
    elif isinstance(node, float) and not math.isfinite(node):
        raise JobError(f"{source}: '{where}': {node} is not valid here; give a finite number")


FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_PATH_ROOT = re.compile(r"^(output|module)")
_PATH_STEP = re.compile(r"\[(\d+)\]|\[(\"[^\"]*\"|'[^']*')\]|\.([A-Za-z_]\w*)")
WEIGHTS_FORMS = "output[1], output.NAME, output[\"KEY\"] or module.NAME"


def parse_weights_path(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """'output[1]' -> ("output", (("item", 1),)); ValueError for anything else."""
    root = _PATH_ROOT.match(text)
    if root is None:
        raise ValueError(f"must start with output or module ({WEIGHTS_FORMS})")
    steps, at = [], root.end()
    while at < len(text):
        step = _PATH_STEP.match(text, at)
        if step is None:
            raise ValueError(f"cannot read {text[at:]!r}; write {WEIGHTS_FORMS}")
        index, key, attr = step.groups()
        steps.append(("item", int(index)) if index else ("item", key[1:-1]) if key else ("attr", attr))
        at = step.end()
    if root.group(1) == "module" and not steps:
        raise ValueError("module alone is the module itself; name its attribute: module.NAME")
    return root.group(1), tuple(steps)


def _check_factory(model: ModelSpec, source: str) -> None:
    """[model] factory, allow_code and attention_modules: refused before any code runs."""
    if model.factory is None:
        if model.attention_modules:
            raise JobError(f"{source}: 'model.attention_modules' applies to a model built by model.factory; "
                           "a transformers model's attention is captured without it")
        return
    if not FACTORY.match(model.factory):
        raise JobError(f"{source}: 'model.factory' {model.factory!r} must be package.module:function")
    if not model.allow_code:
        raise JobError(f"{source}: 'model.factory' runs Python code ({model.factory}); set model.allow_code "
                       "= true in [model] if you trust it")
    if model.name != ModelSpec.model_fields["name"].default:  # the default: a JobSpec dumped and read back
        raise JobError(f"{source}: 'model.name' and 'model.factory' are both set; the factory builds the "
                       "model, so leave model.name out")
    for i, spec in enumerate(model.attention_modules):
        where = f"{source}: 'model.attention_modules[{i}]"
        parts = spec.pattern.split(".")
        if not all(parts):
            raise JobError(f"{where}.pattern' {spec.pattern!r} must be a dotted module name, `*` for one part "
                           "(blocks.*.attn)")
        try:
            spec.path()
        except ValueError as exc:
            raise JobError(f"{where}.weights' {spec.weights!r}: {exc}") from None


def template_fields(template: str) -> list[str]:
    """The placeholders of a generate.template, in order; ValueError for a malformed one."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_generate(job: JobSpec, source: str) -> None:
    """[generate] and corpus.context_column: refused before any model loads."""
    gen, corpus = job.generate, job.corpus
    if gen is None:
        if corpus.context_column is not None:
            raise JobError(f"{source}: 'corpus.context_column' is for generate runs; add a [generate] section "
                           "whose template places {context}, or remove context_column")
        return
    if job.model.factory is not None:
        raise JobError(f"{source}: [generate] runs transformers language models; a model.factory model cannot be "
                       "generated from: remove [generate] or model.factory")
    if corpus.target_column is not None:
        raise JobError(f"{source}: 'corpus.target_column' and [generate] are both set; a generate run writes its "
                       "own text from a decoder model: remove one of them")
    if corpus.context_column is not None and corpus.context_column in (corpus.text_column, corpus.id_column,
                                                                      *corpus.metadata_columns):
        raise JobError(f"{source}: 'corpus.context_column' {corpus.context_column!r} is also the text, id or a "
                       "metadata column; the context needs a column of its own")
    if gen.min_new_tokens > gen.max_new_tokens:
        raise JobError(f"{source}: 'generate.min_new_tokens' ({gen.min_new_tokens}) is more than max_new_tokens "
                       f"({gen.max_new_tokens}); lower it or raise max_new_tokens")
    fields: list[str] = []
    if gen.template is not None:
        try:
            fields = template_fields(gen.template)
        except ValueError as exc:
            raise JobError(f"{source}: 'generate.template': {exc}; write placeholders as {{text}} and {{context}}, "
                           "literal braces as {{{{ and }}}}") from None
        unknown = [f for f in fields if f not in ("text", "context")]
        if unknown:
            raise JobError(f"{source}: 'generate.template' has the placeholder {{{unknown[0]}}}; valid: {{text}} (the "
                           "corpus text), {{context}} (corpus.context_column)")
        if "text" not in fields:
            raise JobError(f"{source}: 'generate.template' does not place {{text}}, the document's text; add it")
        if len(fields) != len(set(fields)):
            raise JobError(f"{source}: 'generate.template' places a field twice; place {{text}} and {{context}} once each")
    if corpus.context_column is not None and "context" not in fields:
        raise JobError(f"{source}: 'corpus.context_column' is set but generate.template does not place {{context}}; "
                       "add it to the template (e.g. template = \"{context}\\n\\nQuestion: {text}\")")
    if "context" in fields and corpus.context_column is None:
        raise JobError(f"{source}: 'generate.template' places {{context}} but corpus.context_column is not set; "
                       "name the column that holds each document's context")


def _check_groups(job: JobSpec, source: str) -> None:
    """[[groups]], corpus.marks and corpus.strip, and the groups recipe: checked (word files read,
    patterns compiled) before any model loads."""
    corpus = job.corpus
    if corpus.strip is not None:
        try:
            re.compile(corpus.strip)
        except re.error as exc:
            raise JobError(f"{source}: 'corpus.strip' {corpus.strip!r} is not a valid regular expression: {exc}") from None
    uses = [i for i, r in enumerate(job.recipes) if r["name"] == "groups"]
    if uses and not job.groups:
        raise JobError(f"{source}: recipes[{uses[0]}] (groups) needs [[groups]] entries: name each group and its "
                       "words, words_files, regex or marked = true")
    keyed = {k.group for i in job.interventions for k in (i.keys, i.except_keys) if k is not None and k.group}
    if job.groups and not uses and not keyed:
        raise JobError(f"{source}: [[groups]] are defined but neither a recipe nor an intervention uses them; add "
                       "[[recipes]] name = \"groups\", or remove them")
    for i in uses:
        if job.recipes[i].get("level") == "word":
            raise JobError(f"{source}: recipes[{i}] (groups) runs on tokens (a group spans whole words already); "
                           "remove level = \"word\"")
    if uses and (corpus.target_column is not None or job.generate is not None):
        raise JobError(f"{source}: the groups recipe runs on single texts; remove it, or target_column / [generate]")
    marked = [g.name for g in job.groups if g.marked or g.only_marked]
    if marked and corpus.marks == "none":
        raise JobError(f"{source}: group {marked[0]!r} uses marked spans but corpus.marks is not set; set "
                       "corpus.marks = \"brackets\" for texts with [marked] spans")
    from .groups import compile_groups

    compile_groups(job.groups, Path(job.base_dir), source)


def _check_metadata_columns(corpus: CorpusSpec, source: str) -> None:
    reserved = load_schemas()["documents"].column_names
    target = corpus.target_column
    if target is not None and target in (corpus.text_column, corpus.id_column, *corpus.metadata_columns):
        raise JobError(f"{source}: 'corpus.target_column' {target!r} is also the text, id or a metadata column; "
                       "the target text needs a column of its own")
    if target is not None and corpus.format == "text":
        raise JobError(f"{source}: 'corpus.target_column' needs records with two text columns (JSON, CSV, "
                       "Parquet, a saved or hub dataset); plain text files hold one text per document")
    seen = set()
    for col in corpus.metadata_columns:
        if col in seen:
            raise JobError(f"{source}: 'corpus.metadata_columns' names {col!r} twice; list each column once")
        if col in reserved:
            raise JobError(f"{source}: 'corpus.metadata_columns': {col!r} is a column of the documents "
                           f"table ({', '.join(reserved)}); metadata columns must have other names")
        seen.add(col)


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job file. Raises JobError naming the key and what is valid."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # editors on Windows write a BOM
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return build_job(data, source=str(path), base_dir=path.parent.resolve(), overrides=overrides)
