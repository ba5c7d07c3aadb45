"""Bad input found by users: each gets one line naming the file, key or value and what is valid,
as a subclass of AttnpipeError; never a traceback, never a run that writes garbage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModel, BertConfig

from attnpipe import hub
from attnpipe.corpus import open_corpus
from attnpipe.errors import CorpusError, JobError, ModelError
from attnpipe.job import CorpusSpec
from attnpipe.model import load_model, pick_device

from conftest import raises_one_line, tiny_model, write_job

ROWS = [{"text": "The cat sat on the mat.", "id": "d1"}, {"text": "Why do rivers bend?", "id": "d2"}]




def _open(base: Path, **spec):
    return open_corpus(CorpusSpec(**spec), base)


def _jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hub_env_offline(monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub and datasets read it at import (a notebook, a
    wrapper script): without honour_offline every hub lookup waits ~25 s on retries."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


# --- 1. tokenizer files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_only_dir(tmp_path_factory) -> Path:
    """config.json + model.safetensors, no tokenizer: used to load with every token [UNK]."""
    path = tmp_path_factory.mktemp("weights-only")
    tiny_model("bert").save_pretrained(path)
    return path


def test_model_folder_without_tokenizer_files(weights_only_dir):
    message = raises_one_line(ModelError, load_model, str(weights_only_dir), device="cpu")
    assert str(weights_only_dir) in message
    for expected in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model"):
        assert expected in message


def test_tokenizer_that_knows_no_word(tmp_path, weights_only_dir):
    """A vocab.txt of only special tokens passes the file check; the probe sentence catches it."""
    folder = tmp_path / "special-only"
    shutil.copytree(weights_only_dir, folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    message = raises_one_line(ModelError, load_model, str(folder), device="cpu")
    assert "unknown" in message and "quick brown fox" in message
    assert str(folder) in message


def test_tokenizer_larger_than_embedding(tmp_path, tiny_model_dir):
    folder = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir("bert"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    AutoModel.from_config(config).save_pretrained(folder)
    message = raises_one_line(ModelError, load_model, str(folder), device="cpu")
    assert "100 rows" in message and "30522" in message


# --- 2. devices ------------------------------------------------------------------------------

def test_mps_without_mps(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    message = raises_one_line(ModelError, pick_device, "mps")
    assert message == "run.device is 'mps' but MPS is not available; use auto or cpu"
    raises_one_line(ModelError, load_model, str(tiny_model_dir("bert")), device="mps")


def test_cuda_index_past_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    message = raises_one_line(ModelError, pick_device, "cuda:2")
    assert "'cuda:2'" in message and "cuda:0 to cuda:1" in message


# --- 3. window length and stride -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir):
    return load_model(str(tiny_model_dir("bert")), device="cpu")  # max 128, [CLS] + [SEP]


def test_check_window_returns_the_window(tiny_bert):
    assert tiny_bert.check_window(None, 32) == 128
    assert tiny_bert.check_window(64, 8) == 64
    assert tiny_bert.check_window(128, 125) == 128  # room for text: 128 - 2 = 126


def test_max_length_above_the_models_maximum(tiny_bert):
    message = raises_one_line(JobError, tiny_bert.check_window, 100000, 32)
    assert "model.max_length" in message and "100000" in message and "128" in message


@pytest.mark.parametrize("max_length, stride", [(64, 62), (64, 100), (None, 126)])
def test_stride_without_room_in_the_window(tiny_bert, max_length, stride):
    message = raises_one_line(JobError, tiny_bert.check_window, max_length, stride)
    assert "model.stride" in message and str(stride) in message


# --- 4. local paths are never taken for hub names --------------------------------------------

@pytest.mark.parametrize("name, local", [
    ("data/corpsu.jsonl", True), ("corpus.parquet", True), ("./models/bert-tiny", True),
    ("~/models/x", True), ("/abs/model", True), ("a/b/c", True), ("models/mybert", True),
    ("gpt2", False), ("org/model", False), ("wikitext", False),
])
def test_local_only_rule(tmp_path, name, local):
    (tmp_path / "models").mkdir()
    assert hub.is_local_only(name, tmp_path) is local


@pytest.mark.parametrize("path", ["data/corpsu.jsonl", "./corpsu", "corpus/sub/file"])
def test_corpus_typo_is_a_missing_file(tmp_path, path):
    start = time.monotonic()
    message = raises_one_line(CorpusError, _open, tmp_path, path=path)
    assert message == f"corpus file not found: {(tmp_path / path).absolute()}"
    assert time.monotonic() - start < 5


def test_corpus_typo_under_existing_folder(tmp_path):
    (tmp_path / "data").mkdir()
    message = raises_one_line(CorpusError, _open, tmp_path, path="data/corpsu")
    assert message == f"corpus file not found: {tmp_path / 'data' / 'corpsu'}"


@pytest.mark.parametrize("name", ["./models/bert-tiny", "models/mybert", "a/b/c"])
def test_model_typo_is_a_missing_path(tmp_path, name):
    (tmp_path / "models").mkdir()
    message = raises_one_line(ModelError, load_model, name, base_dir=tmp_path, device="cpu")
    assert message == f"model path does not exist: {(tmp_path / name).absolute()}"


def test_model_path_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = raises_one_line(ModelError, load_model, "model.safetensors", base_dir=tmp_path, device="cpu")
    assert str(tmp_path / "model.safetensors") in message


def test_hub_like_model_name_shows_the_local_path_tried(tmp_path, hub_env_offline):
    start = time.monotonic()
    message = raises_one_line(ModelError, load_model, "no-such-org/no-such-model", base_dir=tmp_path, device="cpu")
    assert f"(tried {tmp_path / 'no-such-org' / 'no-such-model'})" in message
    assert "'no-such-org/no-such-model'" in message and "Hub" in message
    assert time.monotonic() - start < 10  # no retries while HF_HUB_OFFLINE is set


def test_hub_like_corpus_name_shows_the_local_path_tried(tmp_path, hub_env_offline):
    start = time.monotonic()
    message = raises_one_line(CorpusError, _open, tmp_path, path="no-such-org/no-such-corpus")
    assert f"(tried {tmp_path / 'no-such-org' / 'no-such-corpus'})" in message
    assert "Hub" in message
    assert time.monotonic() - start < 10


# --- 5. files that are not what their suffix says --------------------------------------------

def test_parquet_file_that_is_text(tmp_path):
    (tmp_path / "c.parquet").write_text("text\nhello\n")
    message = raises_one_line(CorpusError, _open, tmp_path, path="c.parquet")
    assert str(tmp_path / "c.parquet") in message and "is not a Parquet file" in message


def test_damaged_parquet_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(folder / "a.parquet"))
    (folder / "b.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    message = raises_one_line(CorpusError, _open, tmp_path, path="docs")
    assert str(folder / "b.parquet") in message


@pytest.mark.parametrize("name, content", [
    ("c.json", '{"text": "a", \n'),
    ("c.jsonl", '{"text": "a"}\n{"text": \n'),
])
def test_invalid_json(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = raises_one_line(CorpusError, _open, tmp_path, path=name)
    assert str(tmp_path / name) in message


def test_invalid_json_in_a_folder_names_the_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    _jsonl(folder / "a.jsonl")
    (folder / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    message = raises_one_line(CorpusError, _open, tmp_path, path="docs")
    assert str(folder / "b.jsonl") in message


def test_csv_without_the_text_column(tmp_path):
    (tmp_path / "c.csv").write_text("id,topic\n1,a\n")
    message = raises_one_line(CorpusError, _open, tmp_path, path="c.csv")
    assert "corpus.text_column" in message and "c.csv" in message and "columns: id, topic" in message


@pytest.mark.parametrize("content", ["text,id\nhello,1,extra,more\n", "text,id\nhello,1,\n"])
def test_csv_first_row_longer_than_header(tmp_path, content):
    """pandas would take the extra fields for an index and shift the text column silently."""
    (tmp_path / "c.csv").write_text(content)
    message = raises_one_line(CorpusError, _open, tmp_path, path="c.csv")
    assert str(tmp_path / "c.csv") in message and "header" in message


def test_csv_unterminated_quote(tmp_path):
    (tmp_path / "c.csv").write_text('text\n"never closed\n')
    message = raises_one_line(CorpusError, _open, tmp_path, path="c.csv")
    assert str(tmp_path / "c.csv") in message


def _break_state(folder: Path):
    (folder / "state.json").write_text("{")


def _drop_arrow(folder: Path):
    for f in folder.glob("*.arrow"):
        f.unlink()


def _garble_arrow(folder: Path):
    for f in folder.glob("*.arrow"):
        f.write_bytes(b"garbage")


def _break_info(folder: Path):
    (folder / "dataset_info.json").write_text("{")


@pytest.mark.parametrize("damage", [_break_state, _drop_arrow, _garble_arrow, _break_info])
def test_damaged_save_to_disk_folder(tmp_path, damage):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    damage(folder)
    message = raises_one_line(CorpusError, _open, tmp_path, path="saved")
    assert str(folder) in message


# --- 6. checking a job file does not import torch --------------------------------------------

def test_load_job_does_not_import_torch(tmp_path):
    job = write_job(tmp_path, "c.jsonl", recipes='[[recipes]]\nname = "topk"\nk = 3\n')
    code = ("import sys; from attnpipe.job import load_job; load_job(sys.argv[1]); "
            "from attnpipe.recipes import RECIPES, validate_recipe, recipe_params, recipe_id; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_recipe_functions_and_types_load_lazily():
    import attnpipe.recipes as recipes
    from attnpipe.recipes import HEAD_MEAN, RECIPES, BatchMasks, LayerAttention
    from attnpipe.recipes.masks import topk

    assert RECIPES["topk"].fn is topk
    assert RECIPES["rollout"].doc and RECIPES["head_stats"].doc
    assert HEAD_MEAN == -1 and BatchMasks.__name__ == "BatchMasks" and LayerAttention.__name__ == "LayerAttention"
    with pytest.raises(AttributeError):
        recipes.no_such_name  # noqa: B018
