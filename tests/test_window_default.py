"""The default window: the length a model folder says the model was trained for
(sentence-transformers' max_seq_length) when it is below the model's maximum; the run says so."""

from __future__ import annotations

import json
import shutil

from conftest import invoke, write_job

from attnpipe.read import open_dataset


def test_declared_training_length_is_the_default_window(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": " ".join(["word"] * 60)}) + "\n")
    job = write_job(tmp_path, corpus, model=model, device="cpu")
    job.write_text(job.read_text().replace("max_length = 64\n", ""))

    preview = invoke("run", job, "--dry-run")
    assert preview.exit_code == 0, preview.output
    assert "windows of 24 tokens (sentence_bert_config.json max_seq_length" in preview.output

    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert "windows of 24 tokens (sentence_bert_config.json max_seq_length" in result.output
    ds = open_dataset(tmp_path / "out")
    assert ds.provenance["window_length"] == 24
    assert ds.to_pandas("tokens").groupby("window_index").position.max().max() == 23


def test_job_max_length_overrides_and_is_named(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a short text"}) + "\n")
    result = invoke("run", write_job(tmp_path, corpus, model=model, device="cpu"))
    assert result.exit_code == 0, result.output
    assert "windows of 64 tokens (model.max_length)" in result.output
