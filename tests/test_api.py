"""The public surface: the import name `attnpipe`, `attnpipe.attend()` for notebooks (checked
against HF eager attention), its inline view, and `attnpipe.run()` for batch jobs."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eager_attentions, tiny_model, write_job

import attnpipe
from attnpipe.errors import JobError, ModelError

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The animal didn't cross the street because it was too tired.", "Why do cats purr?"]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


# --- the import name ---------------------------------------------------------------------------

def test_import_attnpipe_is_light_and_complete(tmp_path):
    done = python("import sys, attnpipe; print(sorted(attnpipe.__all__)); print('torch' in sys.modules)", tmp_path)
    assert done.returncode == 0, done.stderr
    names, torch_loaded = done.stdout.splitlines()
    assert {"attend", "run", "open_dataset", "AttnDataset"} <= set(eval(names))
    assert torch_loaded == "False"
    assert {"attend", "run", "open_dataset"} <= set(dir(attnpipe))


def test_pipeline_is_not_installed_and_cannot_shadow_attnpipe(tmp_path):
    (tmp_path / "pipeline.py").write_text("raise SystemExit('a user script named pipeline.py ran')\n")
    (tmp_path / "other").mkdir()
    assert "No module named 'pipeline'" in python("import pipeline", tmp_path / "other").stderr
    # A notebook beside the user's own pipeline.py, using transformers' `pipeline` and ours.
    done = python("from transformers import pipeline\nfrom attnpipe import open_dataset, attend\n"
                  "print(callable(pipeline), open_dataset.__module__)", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "attnpipe.read.dataset"]


# --- attend() ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_attend_dense_maps_equal_hf_eager(arch, tokenizer, tiny_model_dir):
    """Every stored row of every head equals HF eager attention (output_attentions=True), with
    padding in the batch (two texts of different lengths), to 1e-5."""
    with attnpipe.attend(TEXTS, model=str(tiny_model_dir(arch)), recipes=[{"name": "dense", "max_tokens": 64}],
                         device="cpu") as att:
        maps = att.to_pandas("maps")
        for i, text in enumerate(TEXTS):
            enc = tokenizer(text, return_tensors="pt")
            reference = eager_attentions(_reloaded(tiny_model_dir(arch)), enc["input_ids"], enc["attention_mask"])
            doc = maps[maps.doc_id == str(i)]
            assert len(doc) == len(reference) * reference[0].shape[1] * enc["input_ids"].shape[1]
            for row in doc.itertuples():
                expected = reference[row.layer][0, row.head, row.query_pos, : len(row.weights)].numpy()
                np.testing.assert_allclose(np.asarray(row.weights), expected, atol=1e-5)


def _reloaded(folder: Path) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, attn_implementation="eager").eval()


def test_attend_model_object_is_left_as_it_was(tokenizer):
    model = tiny_model("bert").train()
    implementation = model.config._attn_implementation
    with attnpipe.attend("A short text.", model=model, tokenizer=tokenizer, recipes=["head_stats"]) as att:
        assert att.tables["head_stats"]["rows"] == 2 * 4
        assert "(object) BertModel" in att.provenance["model"]
    assert model.training and model.config._attn_implementation == implementation
    with pytest.raises(ModelError, match="tokenizer"):
        attnpipe.attend("x", model=model)


def test_attend_read_api_view_and_cleanup(tiny_model_dir):
    hostile = 'He said "</script><script>alert(1)</script>" <!-- and left.'
    att = attnpipe.attend([TEXTS[0], hostile], model=str(tiny_model_dir("bert")), ids=["a", "b<!--"], device="cpu")
    assert {"documents", "tokens", "head_stats", "edges", "rollout", "maps"} <= set(att.tables)
    top = att.sql("SELECT recipe_label, count(*) AS n FROM edges_tokens GROUP BY 1")
    assert list(top.recipe_label) == ["topk_k8_mean"]
    assert len(att.heads()) == 2 * 4
    assert att.plot("a", 1, "mean", words=True).axes
    page = att._repr_html_()
    assert page.startswith('<iframe sandbox="allow-scripts" srcdoc="')
    inner = html.unescape(page.split('srcdoc="', 1)[1].rsplit('" style=', 1)[0])
    assert "<script>alert(1)" not in inner and "</script><script>" not in inner.split('id="hv-data">', 1)[1].split(
        "</script>", 1)[0]
    folder = att.path.parent
    assert folder.is_dir()
    att.close()
    assert not folder.exists()


def test_attend_bad_input_is_one_line():
    with pytest.raises(JobError, match="texts\\[1\\] is a int"):
        attnpipe.attend(["fine", 5])
    with pytest.raises(JobError, match="as many ids as texts"):
        attnpipe.attend(["a", "b"], ids=["only-one"])


# --- run() -------------------------------------------------------------------------------------

def test_run_returns_the_dataset_and_takes_overrides(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    job = write_job(tmp_path, corpus, model=tiny_model_dir("bert"), device="cpu")
    ds = attnpipe.run(job, quiet=True, corpus__limit=2)
    assert ds.tables["documents"]["rows"] == 2 and ds.summary.shards_run == [0]
    again = attnpipe.run(job, quiet=True)  # the rest, as new shards
    assert again.tables["documents"]["rows"] == 4


# --- start-up: commands that need no model never import torch ----------------------------------

TORCH_FREE = [["recipes"], ["schema", "edges"], ["status", "{out}"], ["files", "{out}", "edges"],
              ["inspect", "{out}"], ["verify", "{out}"], ["heads", "{out}"],
              ["query", "{out}", "SELECT count(*) FROM head_stats"], ["run", "{job}", "--dry-run"]]


def test_commands_without_a_model_never_import_torch(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    job = write_job(tmp_path, corpus, model=tiny_model_dir("bert"), device="cpu")
    attnpipe.run(job, quiet=True)
    probe = ("import atexit, sys\natexit.register(lambda: print('TORCH', 'torch' in sys.modules, file=sys.stderr))\n"
             "from attnpipe.cli import main\nsys.argv = ['attnpipe'] + sys.argv[1:]\nmain()\n")
    for command in TORCH_FREE:
        args = [a.format(out=tmp_path / "out", job=job) for a in command]
        done = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (command, done.stderr)
        assert "TORCH False" in done.stderr, command
