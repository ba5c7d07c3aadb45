"""Generate runs: every decoding step's attention against HF `generate` with eager attention and
output_attentions=True, rows compared step by step, on tiny GPT-2 and Llama-GQA language models
with left padding in the batch; the grounding features against a hand computation; the job's
checks; sampling, stop strings, and a kill mid-generation.

Tolerances: attention weights and grounding features 1e-5 absolute (float32; the reference runs
eager attention, attnpipe SDPA for the layer outputs and its own softmax for the rows), log-probabilities 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from attnpipe.generate import steps
from attnpipe.read import open_dataset
from conftest import VOCAB, error_line, invoke

CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=None, eos_token_id=None),
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=None, eos_token_id=None),
}
ROWS = [
    {"id": "a", "question": "Where is the mill?", "context": "The old mill stands by the river, north of town."},
    {"id": "b", "question": "Who?", "context": "Nobody."},
    {"id": "c", "question": "What colour was the boat that the fisherman painted last spring?",
     "context": "The fisherman painted his boat blue last spring, after the storm."},
]
TEMPLATE = "Context: {context}\\nQuestion: {text}\\nAnswer:"
NEW = 5


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(1)
            path = tmp_path_factory.mktemp(f"lm-{arch}")
            AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def corpus(folder: Path, rows=ROWS) -> Path:
    path = folder / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gen_job(folder: Path, model: Path, *, generate: str = "", recipes: str | None = None, corpus_extra: str = "",
            out: str = "out", rows=ROWS, **run) -> Path:
    run = {"output": str(folder / out), "progress": False, "weight_dtype": "float32", **run}
    recipes = recipes if recipes is not None else (
        '[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 4\n'
        '[[recipes]]\nname = "threshold"\nt = 0.2\nper_head = false\n')
    text = (f'name = "gen"\n[corpus]\npath = "{corpus(folder, rows)}"\ntext_column = "question"\n'
            f'context_column = "context"\nid_column = "id"\n{corpus_extra}\n[model]\nname = "{model}"\n[run]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in run.items())
            + f'[generate]\ntemplate = "{TEMPLATE}"\nmax_new_tokens = {NEW}\nbatch_size = 3\n{generate}\n' + recipes)
    path = folder / "job.toml"
    path.write_text(text)
    return path


def run_ok(job: Path) -> None:
    result = invoke("run", job)
    assert result.exit_code == 0, result.output


def reference(model_dir: Path, prompts: list[list[int]], pad: int):
    """HF generate, eager attention, greedy, the same left-padded batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_attentions=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    return out, width


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_steps_match_hf_generate(arch, lm_dir, tmp_path, tokenizer):
    model = lm_dir(arch)
    run_ok(gen_job(tmp_path, model))
    ds = open_dataset(tmp_path / "out")
    tokens = ds.to_pandas("tokens").sort_values(["doc_id", "position"])
    docs = sorted(tokens.doc_id.unique())
    prompts = [tokens[(tokens.doc_id == d) & (tokens.side == "source")].token_id.tolist() for d in docs]
    out, width = reference(model, prompts, tokenizer.pad_token_id)
    gens = ds.to_pandas("generations").sort_values(["doc_id", "step"])
    edges = ds.to_pandas("edges")
    grounding = ds.to_pandas("grounding")
    layers = len(out.attentions[0])
    for b, doc in enumerate(docs):
        n, pad = len(prompts[b]), width - len(prompts[b])
        mine = gens[gens.doc_id == doc]
        assert mine.token_id.tolist() == out.sequences[b, width:].tolist()
        logp = torch.stack([torch.log_softmax(step[b].float(), -1)[t] for step, t in
                            zip(out.logits, out.sequences[b, width:])])
        np.testing.assert_allclose(mine.logprob.to_numpy(), logp.numpy(), atol=1e-4)
        segments = tokens[(tokens.doc_id == doc) & (tokens.side == "source")].segment.to_numpy()
        context = torch.tensor(segments == "context")
        for s in range(NEW):
            for layer in range(layers):
                row = out.attentions[s][layer][b, :, -1, pad:]  # (head, keys): the query of step s
                want = hand_grounding(row, context, n, s)
                got = grounding[(grounding.doc_id == doc) & (grounding.step == s) & (grounding.layer == layer)]
                got = got.sort_values("head")
                for name, values in want.items():
                    np.testing.assert_allclose(got[name].to_numpy(), values, atol=1e-5, err_msg=f"{name} {s}")
                if s == 0:
                    continue
                rows = edges[(edges.doc_id == doc) & (edges.step == s) & (edges.layer == layer)
                             & (edges.recipe == "topk")]
                assert set(rows.query_pos) == {n + s - 1}
                weight, key = row.topk(4, dim=-1)
                for head in range(row.shape[0]):
                    h = rows[rows["head"] == head].sort_values("weight", ascending=False)
                    np.testing.assert_allclose(h.weight.to_numpy(), weight[head].numpy(), atol=1e-5)
                    assert sorted(h.key_pos) == sorted(key[head].tolist())
                mean = row.mean(0)
                kept = edges[(edges.doc_id == doc) & (edges.step == s) & (edges.layer == layer)
                             & (edges.recipe == "threshold")]
                assert sorted(kept.key_pos) == torch.nonzero(mean > 0.2)[:, 0].tolist()
        # The prompt's own rows (step null) are the prefill's, cut to the document's tokens.
        prefill = out.attentions[0]
        for layer in range(layers):
            rows = edges[(edges.doc_id == doc) & edges.step.isna() & (edges.layer == layer) & (edges.recipe == "topk")]
            assert len(rows) == sum(min(4, q + 1) for q in range(n)) * prefill[layer].shape[1]
            ref = prefill[layer][b, :, pad:, pad:]
            for r in rows.itertuples():
                assert abs(ref[r.head, r.query_pos, r.key_pos].item() - r.weight) < 1e-5


def hand_grounding(row: torch.Tensor, context: torch.Tensor, n: int, step: int) -> dict[str, np.ndarray]:
    """The grounding features of one query row (head, keys), written out plainly."""
    out = {k: [] for k in ("lookback_ratio", "context_mass", "prompt_mass", "generated_mass", "self_mass",
                           "prev_mass", "entropy")}
    for h in range(row.shape[0]):
        p = row[h].double()
        ctx = p[:n][context].sum().item()
        gen = p[n:].sum().item()
        c_mean = ctx / context.sum().item()
        g_mean = gen / step if step else 0.0
        out["lookback_ratio"].append(c_mean / (c_mean + g_mean))
        out["context_mass"].append(ctx)
        out["prompt_mass"].append(p[:n].sum().item() - ctx)
        out["generated_mass"].append(gen)
        out["self_mass"].append(p[-1].item())
        out["prev_mass"].append(p[-2].item())
        out["entropy"].append(-sum(x * math.log(x) for x in p.tolist() if x > 0))
    return {k: np.array(v) for k, v in out.items()}


def test_lookback_ratio_by_hand():
    """Four prompt tokens (two of them the context), two generated; the query is the last."""
    p = torch.tensor([0.1, 0.3, 0.2, 0.1, 0.1, 0.2])[None, None, None, :]  # (layer, batch, head, keys)
    real = torch.ones(1, 6, dtype=torch.bool)
    prompt = torch.tensor([[True, True, True, True, False, False]])
    context = torch.tensor([[False, True, True, False, False, False]])
    none = torch.zeros(1, 6, dtype=torch.bool)
    facts = steps.KeyFacts(torch.tensor([0]), real, context, prompt, none, none, none, torch.tensor([4]))
    f = {k: v.item() for k, v in steps.grounding(p, facts, step=2).items()}
    # context: 0.3 + 0.2 over 2 tokens = 0.25 each; generated: 0.1 + 0.2 over 2 = 0.15 each
    assert f["context_mass"] == pytest.approx(0.5)
    assert f["context_mean"] == pytest.approx(0.25)
    assert f["generated_mean"] == pytest.approx(0.15)
    assert f["lookback_ratio"] == pytest.approx(0.25 / 0.40)
    assert f["prompt_mass"] == pytest.approx(0.2)
    assert f["self_mass"] == pytest.approx(0.2) and f["prev_mass"] == pytest.approx(0.1)
    assert f["keys"] == 6


def test_tables_and_segments(lm_dir, tmp_path):
    run_ok(gen_job(tmp_path, lm_dir("llama")))
    ds = open_dataset(tmp_path / "out")
    docs = ds.to_pandas("documents").set_index("doc_id")
    assert (docs.generated_tokens == NEW).all() and (docs.stop_reason == "length").all()
    tokens = ds.to_pandas("tokens")
    prompt = docs.loc["a", "prompt_text"]
    context = tokens[(tokens.doc_id == "a") & (tokens.segment == "context")]
    assert prompt[context.char_start.min():context.char_end.max()] == ROWS[0]["context"].rstrip(".") + "." \
        or ROWS[0]["context"] in prompt[context.char_start.min():context.char_end.max() + 1]
    question = tokens[(tokens.doc_id == "a") & (tokens.segment == "question")]
    assert ROWS[0]["question"].startswith(prompt[question.char_start.min():question.char_end.max()][:5])
    generated = tokens[(tokens.doc_id == "a") & (tokens.side == "generated")].sort_values("position")
    gens = ds.to_pandas("generations", filter={"doc_id": "a"}).sort_values("step")
    assert generated.position.tolist() == gens.position.tolist()
    text = docs.loc["a", "generated_text"]
    assert "".join(text[a:b] for a, b in zip(gens.char_start, gens.char_end)).replace(" ", "") == text.replace(" ", "")
    provenance = ds.provenance
    assert provenance["lookback_context"] == "context segment"
    assert provenance["step_recipes"] == ["head_stats", "topk", "threshold"]


def test_sampling_is_seeded_per_document(lm_dir, tmp_path):
    texts = []
    for name, seed, batch in (("one", 3, 3), ("two", 3, 1), ("three", 4, 3)):
        folder = tmp_path / name
        folder.mkdir()
        job = gen_job(folder, lm_dir("gpt2"), generate=f"sample = true\nseed = {seed}\ntop_k = 50\n",
                      recipes='[[recipes]]\nname = "head_stats"\n')
        text = job.read_text().replace("batch_size = 3", f"batch_size = {batch}")
        job.write_text(text)
        run_ok(job)
        docs = open_dataset(folder / "out").to_pandas("documents").sort_values("doc_id")
        texts.append(docs.generated_text.tolist())
    assert texts[0] == texts[1]  # the batch a document ran in does not change its draw
    assert texts[0] != texts[2]


def test_stop_string(lm_dir, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    run_ok(gen_job(first, lm_dir("gpt2"), recipes='[[recipes]]\nname = "head_stats"\n'))
    gens = open_dataset(first / "out").to_pandas("generations", filter={"doc_id": "a"}).sort_values("step")
    word = gens.token.iloc[1].lstrip("#")
    second = tmp_path / "second"
    second.mkdir()
    run_ok(gen_job(second, lm_dir("gpt2"), generate=f"stop = [{json.dumps(word)}]\n",
                   recipes='[[recipes]]\nname = "head_stats"\n'))
    ds = open_dataset(second / "out")
    doc = ds.to_pandas("documents").set_index("doc_id").loc["a"]
    assert doc.stop_reason == "stop" and doc.generated_tokens <= 2
    assert word in doc.generated_text
    stopped = ds.to_pandas("generations", filter={"doc_id": "a"})
    assert stopped.stop.sum() == 1 and stopped.sort_values("step").stop.iloc[-1]


@pytest.mark.parametrize("generate, corpus_extra, expect", [
    ('template = "Q: {question}"', "", "placeholder {question}"),
    ('template = "Q: {context}"', "", "does not place {text}"),
    ('stop = [""]', "", "stop strings must not be empty"),
    ("max_new_tokens = 0", "", "max_new_tokens"),
])
def test_bad_generate_sections(generate, corpus_extra, expect, lm_dir, tmp_path):
    job = gen_job(tmp_path, lm_dir("gpt2"))
    text = job.read_text()
    if generate.startswith("template"):
        text = text.replace(f'template = "{TEMPLATE}"', generate)
    else:
        text = text.replace("batch_size = 3\n", f"batch_size = 3\n{generate}\n").replace(f"max_new_tokens = {NEW}\n", "") \
            if "max_new_tokens" in generate else text.replace("batch_size = 3\n", f"batch_size = 3\n{generate}\n")
    job.write_text(text)
    assert expect in error_line(invoke("run", job))


def test_context_without_template_placeholder(lm_dir, tmp_path):
    job = gen_job(tmp_path, lm_dir("gpt2"))
    job.write_text(job.read_text().replace(f'template = "{TEMPLATE}"', 'template = "Q: {text}"'))
    assert "does not place {context}" in error_line(invoke("run", job))


def test_encoder_is_refused(tmp_path, tiny_model_dir):
    job = gen_job(tmp_path, tiny_model_dir("bert"))
    line = error_line(invoke("run", job))
    assert "needs a decoder language model" in line and "bert" in line


def test_prompt_too_long(lm_dir, tmp_path):
    rows = ROWS + [{"id": "z", "question": "long " * 200, "context": "c"}]
    line = error_line(invoke("run", gen_job(tmp_path, lm_dir("gpt2"), rows=rows)))
    assert "document 'z'" in line and "max_new_tokens" in line
    assert not (tmp_path / "out" / "generations").exists()


def test_rerun_after_kill_matches_clean_run(lm_dir, tmp_path):
    """A kill after the first generation batch loses nothing once rerun (faults.point('batch'))."""
    import os
    import subprocess
    import sys

    rows = [dict(r, id=f"{r['id']}{i}") for i in range(3) for r in ROWS]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for folder in (clean, killed):
        folder.mkdir()
        gen_job(folder, lm_dir("gpt2"), rows=rows, num_shards=2)
    run_ok(clean / "job.toml")
    env = {**os.environ, "ATTNPIPE_FAULT": "batch:2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "attnpipe.cli", "run", str(killed / "job.toml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    run_ok(killed / "job.toml")
    a, b = open_dataset(clean / "out"), open_dataset(killed / "out")
    for table in ("generations", "grounding", "documents", "edges"):
        x = a.to_pandas(table).drop(columns=["shard"], errors="ignore")
        y = b.to_pandas(table).drop(columns=["shard"], errors="ignore")
        keys = [c for c in ("doc_id", "step", "layer", "head", "query_pos", "key_pos", "recipe") if c in x]
        x, y = x.sort_values(keys).reset_index(drop=True), y.sort_values(keys).reset_index(drop=True)
        assert len(x) == len(y) and x.equals(y), table
