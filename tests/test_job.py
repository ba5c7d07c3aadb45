"""Job specs: every mistake is reported before any work starts, naming the key and what is
valid; CLI overrides replace the file's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnpipe.errors import AttnpipeError, JobError
from attnpipe.job import JobSpec, build_job, load_job
from attnpipe.recipes import RECIPES

from conftest import write_job


def _job(**sections) -> dict:
    data = {"corpus": {"path": "corpus.jsonl"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def _error(data: dict, exc=AttnpipeError) -> str:
    with pytest.raises(exc) as info:
        build_job(data, source="job.toml")
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith("job.toml"), "errors name the job file"
    return message


def test_minimal_job_has_defaults():
    job = build_job(_job())
    assert job.model.name == "all-MiniLM-L6-v2"
    assert job.run.num_shards == 1 and job.run.device == "auto"
    # The default recipe set: head statistics, top-8 keys on the head mean, rollout top 8.
    assert [(r["name"], r.get("k"), r.get("per_head")) for r in job.recipes] == [
        ("head_stats", None, None), ("topk", 8, False), ("rollout", 8, None)]
    assert job.run.weight_dtype == "bfloat16"


def test_fingerprint_names_what_changed_and_ignores_path_spelling(tmp_path):
    from attnpipe.job import fingerprint_diff, load_job

    (tmp_path / "job.toml").write_text('[corpus]\npath = "c.jsonl"\n')
    rel = load_job(tmp_path / "job.toml")
    again = load_job(tmp_path / ".." / tmp_path.name / "job.toml")
    assert rel.fingerprint() == again.fingerprint()
    changed = build_job(_job(**{"run": {"weight_dtype": "float32"}}), base_dir=tmp_path)
    diff = fingerprint_diff(build_job(_job(), base_dir=tmp_path).fingerprint_parts(), changed.fingerprint_parts())
    assert diff == ['run.weight_dtype: "bfloat16" -> "float32"']


@pytest.mark.parametrize("name", ["../../x", ".hidden", "a/b", ""])
def test_job_name_must_be_a_plain_folder_name(name):
    assert "'name'" in _error(_job(name=name))


def test_repeated_recipe_is_refused():
    msg = _error(_job(recipes=[{"name": "topk", "k": 3}, {"name": "head_stats"}, {"name": "topk", "k": 3}]))
    assert "recipes[2] repeats recipes[0]" in msg


@pytest.mark.parametrize("cols, word", [(["topic", "topic"], "twice"), (["shard"], "documents table")])
def test_bad_metadata_columns(cols, word):
    assert word in _error(_job(corpus={"path": "c.jsonl", "metadata_columns": cols}))


@pytest.mark.parametrize("section, key, model", [
    ("run", "num_shard", "RunSpec"), ("model", "nmae", "ModelSpec"), ("corpus", "text_col", "CorpusSpec")])
def test_unknown_key_names_key_and_valid_keys(section, key, model):
    data = _job(**{section: {key: 1}})
    message = _error(data, JobError)
    assert f"unknown key '{section}.{key}'" in message
    import attnpipe.job as job_module
    for valid in getattr(job_module, model).model_fields:
        assert valid in message


def test_unknown_top_level_key():
    message = _error({**_job(), "recipe": [{"name": "topk"}]}, JobError)
    assert "unknown key 'recipe'" in message
    assert "recipes" in message and "corpus" in message


@pytest.mark.parametrize("section, key, value, expected", [
    ("run", "num_shards", "4", "run.num_shards"),
    ("run", "batch_tokens", 1.5, "run.batch_tokens"),
    ("model", "max_length", "128", "model.max_length"),
    ("model", "allow_pickle", "yes", "model.allow_pickle"),
    ("corpus", "metadata_columns", "topic", "corpus.metadata_columns"),
])
def test_wrong_type_names_key_and_value(section, key, value, expected):
    message = _error(_job(**{section: {key: value}}), JobError)
    assert f"'{expected}'" in message
    assert repr(value) in message


@pytest.mark.parametrize("section, key, value", [
    ("run", "num_shards", 0), ("run", "batch_tokens", 0), ("corpus", "limit", 0),
    ("model", "dtype", "float64"), ("corpus", "format", "xml"), ("model", "max_length", 2)])
def test_out_of_range_values(section, key, value):
    message = _error(_job(**{section: {key: value}}), JobError)
    assert f"{section}.{key}" in message


def test_missing_corpus_section():
    message = _error({"model": {"name": "x"}}, JobError)
    assert "missing required key 'corpus'" in message


def test_missing_corpus_path():
    message = _error({"corpus": {"text_column": "body"}}, JobError)
    assert "missing required key 'corpus.path'" in message


@pytest.mark.parametrize("device", ["nvidia", "gpu0", "cuda:x", "cuda:", "CPU", "tpu"])
def test_bad_device(device):
    message = _error(_job(run={"device": device}), JobError)
    assert "run.device" in message and repr(device) in message
    assert "cuda:N" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_good_device(device):
    assert build_job(_job(run={"device": device})).run.device == device


def test_bad_recipe_name_lists_valid_names():
    message = _error(_job(recipes=[{"name": "head_stats"}, {"name": "topkk"}]))
    assert "recipes[1]" in message and "'topkk'" in message
    for name in RECIPES:
        assert name in message


def test_recipe_without_name():
    message = _error(_job(recipes=[{"k": 3}]))
    assert "recipes[0]" in message and "name" in message
    for name in RECIPES:
        assert name in message


def test_empty_recipe_list():
    message = _error(_job(recipes=[]), JobError)
    assert "recipes" in message
    for name in RECIPES:
        assert name in message


@pytest.mark.parametrize("recipe, key", [
    ({"name": "topk", "k": 0}, "k"),
    ({"name": "topk", "k": "5"}, "k"),
    ({"name": "threshold", "t": 1.5}, "t"),
    ({"name": "threshold", "t": -0.1}, "t"),
    ({"name": "topp", "p": 0.0}, "p"),
    ({"name": "rollout", "k": 0}, "k"),
    ({"name": "dense", "max_tokens": 0}, "max_tokens"),
])
def test_bad_recipe_parameter(recipe, key):
    message = _error(_job(recipes=[recipe]))
    assert f"({recipe['name']})" in message and f"'{key}'" in message
    assert repr(recipe[key]) in message


def test_unknown_recipe_parameter_lists_valid_params():
    message = _error(_job(recipes=[{"name": "topk", "kk": 3}]))
    assert "unknown parameter 'kk'" in message
    assert "k" in message and "per_head" in message


def test_recipe_without_params_rejects_any():
    message = _error(_job(recipes=[{"name": "head_stats", "k": 3}]))
    assert "unknown parameter 'k'" in message


def test_recipe_defaults_filled_in():
    job = build_job(_job(recipes=[{"name": "topk", "k": 3}, {"name": "threshold"}]))
    assert job.recipes == [{"name": "topk", "k": 3, "per_head": True},
                           {"name": "threshold", "t": 0.1, "per_head": True}]


@pytest.mark.parametrize("max_length, stride", [(16, 16), (16, 20), (16, 14), (8, 6)])
def test_stride_must_be_smaller_than_window(max_length, stride):
    message = _error(_job(model={"max_length": max_length, "stride": stride}), JobError)
    assert "model.stride" in message and str(stride) in message


def test_stride_just_below_window_ok():
    job = build_job(_job(model={"max_length": 16, "stride": 13}))
    assert job.model.stride == 13


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[corpus]\npath = "x.jsonl\n')
    with pytest.raises(JobError, match="not valid TOML") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_job_file_not_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[corpus]\npath = "caf\xe9.jsonl"\n')
    with pytest.raises(JobError, match="not valid TOML"):
        load_job(path)


def test_job_file_missing(tmp_path):
    with pytest.raises(JobError, match="job file not found") as info:
        load_job(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_job_file_is_a_folder(tmp_path):
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path)


def test_load_job_name_and_base_dir(tmp_path):
    path = tmp_path / "my-job.toml"
    path.write_text('[corpus]\npath = "data/c.jsonl"\n')
    job = load_job(path)
    assert job.name == "my-job"
    assert job.resolve(job.corpus.path) == tmp_path / "data" / "c.jsonl"
    assert job.output_dir() == Path("out/my-job")


def test_error_from_file_names_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[corpus]\npath = "c.jsonl"\n[run]\nnum_shards = "4"\n')
    with pytest.raises(JobError) as info:
        load_job(path)
    assert str(info.value).startswith(str(path))
    assert "run.num_shards" in str(info.value)


def test_overrides_take_effect(tmp_path):
    path = write_job(tmp_path, tmp_path / "c.jsonl", num_shards=2, device="auto")
    job = load_job(path, overrides={"run.output": str(tmp_path / "elsewhere"), "corpus.limit": 5,
                                    "run.num_shards": 3, "run.device": "cpu", "model.dtype": "bfloat16",
                                    "run.batch_tokens": 100, "model.name": "other-model"})
    assert job.output_dir() == tmp_path / "elsewhere"
    assert job.corpus.limit == 5
    assert job.run.num_shards == 3
    assert job.run.device == "cpu"
    assert job.model.dtype == "bfloat16"
    assert job.run.batch_tokens == 100
    assert job.model.name == "other-model"


def test_none_overrides_keep_file_values(tmp_path):
    path = write_job(tmp_path, tmp_path / "c.jsonl", num_shards=2)
    job = load_job(path, overrides={"run.num_shards": None, "corpus.limit": None, "run.output": None})
    assert job.run.num_shards == 2 and job.corpus.limit is None
    assert job.output_dir() == tmp_path / "out"


def test_overrides_are_validated(tmp_path):
    path = write_job(tmp_path, tmp_path / "c.jsonl")
    with pytest.raises(JobError, match="run.device"):
        load_job(path, overrides={"run.device": "gpu"})


def test_fingerprint_ignores_output_device_progress():
    base = build_job(_job())
    same = build_job(_job(run={"output": "elsewhere", "device": "cpu", "progress": False},
                          description="changed"))
    assert base.fingerprint() == same.fingerprint()
    for changed in (_job(run={"num_shards": 2}), _job(recipes=[{"name": "topk"}]), _job(model={"stride": 4})):
        assert build_job(changed).fingerprint() != base.fingerprint()
    # A limit only decides how many rows are planned: a larger one grows the data (see test_reruns).
    assert build_job(_job(corpus={"limit": 3})).fingerprint() == base.fingerprint()


def test_build_job_does_not_mutate_input():
    data = _job(run={"num_shards": 2})
    build_job(data, overrides={"run.num_shards": 5})
    assert data == {"corpus": {"path": "corpus.jsonl"}, "run": {"num_shards": 2}}
    assert isinstance(build_job(data), JobSpec)
