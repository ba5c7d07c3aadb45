"""What a generate run checks once its model is loaded, and the provenance it records."""

from __future__ import annotations

from ..errors import JobError
from .prompts import uses_chat_template
from .steps import STEP_RECIPES


def generate_window(job, lm) -> int:
    """The most tokens a prompt and its generation may hold: model.max_length when the job sets
    it (up to what the model states), else the model's stated positions."""
    stated = lm.stated_max_length
    if job.model.max_length is not None and job.model.max_length > stated:
        raise JobError(f"model.max_length is {job.model.max_length} but model {lm.name!r} states {stated} positions; "
                       f"use a value up to {stated}, or leave it out")
    return job.model.max_length or stated


def check_generate(job, lm) -> dict:
    """Refuse a model that cannot generate; the provenance entries of a generate run."""
    gen = job.generate
    if not lm.causal or lm.model.get_output_embeddings() is None:
        raise JobError(f"[generate] needs a decoder language model (GPT-2, Llama, SmolLM2-135M-Instruct, ...); "
                       f"{lm.name} ({type(lm.model).__name__}) is not one: remove [generate] or choose such a model")
    step = [r["name"] for r in job.recipes if r["name"] in STEP_RECIPES and r.get("level", "token") == "token"]
    prompt_only = [r["name"] + ("(word)" if r.get("level") == "word" else "") for r in job.recipes
                   if r["name"] not in STEP_RECIPES or r.get("level") == "word"]
    return {"generate": gen.model_dump(),
            "chat_template": uses_chat_template(lm.tokenizer, gen.chat_template),
            "step_recipes": step, "prompt_only_recipes": prompt_only,
            "lookback_context": "context segment" if job.corpus.context_column else "whole prompt",
            "generate_backend": "torch recipes; layer outputs " + lm.capture_backend}
