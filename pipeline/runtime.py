"""What a worker builds once per job and keeps for every shard it runs: the opened corpus with
its doc ids, the model and tokenizer, the window length, and the provenance stored with the data.

Built by the local executor today and by each Dask worker later; nothing here knows which.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .corpus import Corpus, open_corpus
from .job import JobSpec
from .recipes import RECIPES
from .store.schema import load_schemas

if TYPE_CHECKING:  # torch and transformers load only when a model does
    from .model import LoadedModel


def open_job_corpus(job: JobSpec) -> Corpus:
    return Corpus(open_corpus(job.corpus, Path(job.base_dir)), job.corpus)


def load_job_model(job: JobSpec) -> "LoadedModel":
    from .model import load_model

    m = job.model
    return load_model(m.name, base_dir=Path(job.base_dir), revision=m.revision, dtype=m.dtype,
                      device=job.run.device, trust_remote_code=m.trust_remote_code,
                      allow_pickle=m.allow_pickle, backend=job.run.attention, factory=m.factory,
                      allow_code=m.allow_code, attention_modules=m.attention_modules,
                      language_model=job.generate is not None or job.effects.logits,
                      classifier=job.generate is None and job.effects.logits)


@dataclass
class Runtime:
    job: JobSpec
    corpus: Corpus
    model: "LoadedModel"
    window_length: int
    provenance: dict
    effect_targets: list[int] | None = None  # token ids of effects.targets (pipeline/control)

    @classmethod
    def build(cls, job: JobSpec, corpus: Corpus | None = None, model: "LoadedModel | None" = None) -> "Runtime":
        corpus = corpus or open_job_corpus(job)
        model = model or load_job_model(job)
        if model.device.type == "cpu":
            from .hostmem import keep_freed_memory

            keep_freed_memory()
        if job.generate is None:
            window = model.check_window(job.model.max_length, job.model.stride)
            model.check_whole_maps(window, job.recipes)
        else:  # a prompt and its generation share the positions the model states
            from .generate.check import generate_window

            window = generate_window(job, model)
        from .pairs import check_pairs  # imports torch, as the model did

        pairs = check_pairs(job, model)  # corpus.target_column: an encoder-decoder's teacher-forced target
        if job.generate is not None:
            from .generate.check import check_generate

            pairs = {**pairs, **check_generate(job, model)}
        provenance = {**model.provenance, **pairs, "job": job.name, "job_fingerprint": job.fingerprint(),
                      "window_length": window, "stride": job.model.stride,
                      "window_from": "model.max_length" if job.model.max_length else model.default_window[1],
                      "weight_dtype": job.run.weight_dtype,
                      "recipes": {r["name"]: RECIPES[r["name"]].version for r in job.recipes},
                      "schemas": {name: s.version for name, s in load_schemas().items()}}
        if job.generate is not None:
            provenance.update(stride=0, window_from="model.max_length" if job.model.max_length
                              else "the positions the model states, for prompt + generated tokens")
        targets = None
        if job.interventions:
            from .control.spec import check_against_model

            targets = check_against_model(job, model.num_layers, model.num_heads, model.tokenizer)
        return cls(job, corpus, model, window, provenance, targets)

    @cached_property
    def group_matchers(self) -> list:
        """The job's [[groups]], compiled (pipeline/groups.py)."""
        from .groups import compile_groups

        return compile_groups(getattr(self.job, "groups", []), Path(self.job.base_dir))

    @property
    def weights_id(self) -> str | None:
        """What identifies the model's weights: their sha256 (local) or the hub revision."""
        p = self.provenance
        return p.get("weights_sha256") or p.get("revision")


def quiet_libraries(quiet: bool = False) -> None:
    """attnpipe's own bar is the progress (in the driver, on every Dask worker): hide the load
    bars of transformers, datasets and huggingface_hub, and their notes below errors."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
