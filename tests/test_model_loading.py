"""Model loading from local directories (offline): save_pretrained folders, pickle checkpoints
only when allowed, remote code never run unless asked, and clear errors for bad sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnpipe.errors import ModelError
from attnpipe.model import BUILTIN_NAMES, DEFAULT_MODEL, builtin_model_dir, load_model, resolve_source

from conftest import tiny_model


@pytest.fixture(scope="module")
def pickle_model_dir(tmp_path_factory, tokenizer):
    """A save_pretrained-style folder whose weights are only a pickle pytorch_model.bin."""
    path = tmp_path_factory.mktemp("tiny-pickle")
    model = tiny_model("bert")
    try:
        model.save_pretrained(path, safe_serialization=False)
    except TypeError:
        model.save_pretrained(path)
    if not list(path.glob("*.bin")):  # this transformers version ignores safe_serialization=False
        for f in path.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    assert not list(path.glob("*.safetensors")) and list(path.glob("*.bin"))
    return path


@pytest.mark.parametrize("arch, causal", [("bert", False), ("gpt2", True)])
def test_load_tiny_model_dir(tiny_model_dir, arch, causal):
    path = tiny_model_dir(arch)
    lm = load_model(str(path), device="cpu")
    assert lm.device == torch.device("cpu")
    assert (lm.num_layers, lm.num_heads, lm.causal) == (2, 4, causal)
    assert lm.provenance["source"] == str(path)
    assert lm.provenance["model"] == str(path)
    assert len(lm.provenance["weights_sha256"]) == 64
    assert lm.provenance["causal"] is causal
    assert lm.max_length == 128
    assert not lm.model.training


def test_relative_model_dir_resolved_against_base_dir(tiny_model_dir):
    path = tiny_model_dir("bert")
    lm = load_model(path.name, base_dir=path.parent, device="cpu")
    assert lm.provenance["source"] == str(path)


def test_weights_hash_is_stable(tiny_model_dir):
    path = tiny_model_dir("bert")
    a = load_model(str(path), device="cpu").provenance["weights_sha256"]
    b = load_model(str(path), device="cpu").provenance["weights_sha256"]
    assert a == b


def test_pickle_checkpoint_refused_by_default(pickle_model_dir):
    with pytest.raises(ModelError) as info:
        load_model(str(pickle_model_dir), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert str(pickle_model_dir) in message


def test_pickle_refusal_says_how_to_allow_it(pickle_model_dir):
    """The user sees a .bin file right there; the error must say it was refused on purpose
    and which job key allows it."""
    with pytest.raises(ModelError) as info:
        load_model(str(pickle_model_dir), device="cpu")
    assert "allow_pickle" in str(info.value), str(info.value)


def test_pickle_checkpoint_loads_when_allowed(pickle_model_dir):
    lm = load_model(str(pickle_model_dir), device="cpu", allow_pickle=True)
    assert (lm.num_layers, lm.num_heads) == (2, 4)
    assert len(lm.provenance["weights_sha256"]) == 64


def test_missing_model_path_names_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(str(missing), device="cpu")
    assert str(missing) in str(info.value)


def test_missing_relative_model_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model("./models/mine", base_dir=tmp_path, device="cpu")
    assert "models/mine" in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as info:
        load_model(str(tmp_path / "model"), device="cpu")
    assert str(tmp_path / "model") in str(info.value)


def test_folder_without_weights(tmp_path, tiny_model_dir):
    target = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir("bert"), target)
    for f in target.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError) as info:
        load_model(str(target), device="cpu")
    assert str(target) in str(info.value)


@pytest.fixture
def hub_offline(monkeypatch):
    """conftest sets HF_HUB_OFFLINE after transformers (and so huggingface_hub) is imported,
    when huggingface_hub has already read it; without this each lookup waits on retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["no-such-model-xyz", "no-such-org/no-such-model-xyz"])
def test_unknown_hub_name_offline(name, hub_offline):
    with pytest.raises(ModelError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message
    assert "locally" in message


def test_hub_style_name_is_not_resolved_as_path(tmp_path):
    assert resolve_source("org/model", tmp_path) == ("org/model", False)


@pytest.mark.parametrize("name", sorted(BUILTIN_NAMES))
def test_builtin_name_resolves_to_packaged_dir(name, tmp_path):
    source, local = resolve_source(name, tmp_path)
    assert local is True
    assert Path(source) == builtin_model_dir()
    assert (Path(source) / "config.json").is_file()


def test_default_model_name_is_builtin():
    from attnpipe.job import ModelSpec

    assert ModelSpec().name == DEFAULT_MODEL and DEFAULT_MODEL in BUILTIN_NAMES


def test_remote_code_not_run_without_trust(tmp_path):
    """A folder whose config needs custom code is refused, and its code is never imported."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "EXECUTED"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_model_dir() / f, folder / f)
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(info.value)
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tiny_model_dir):
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model(str(tiny_model_dir("bert")), device="cuda")



# --- broken model folders: one line naming the folder or file, never a traceback or garbage ---

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[20] ^= 0x10  # inside the JSON header
    f.write_bytes(bytes(data))


def _random(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


BROKEN = {  # what is done to a good folder -> what the one line must say
    "more layers in config": (lambda f: _config(f, num_hidden_layers=4), "weights the checkpoint lacks"),
    "fewer layers in config": (lambda f: _config(f, num_hidden_layers=1), "has no place for"),
    "hidden_size": (lambda f: _config(f, hidden_size=64), "other sizes"),
    "max_position_embeddings": (lambda f: _config(f, max_position_embeddings=256), "position_embeddings"),
    "truncated weights": (_truncate, "model.safetensors"),
    "bit-flipped weights": (_flip, "model.safetensors"),
    "random weights": (_random, "model.safetensors"),
    "broken tokenizer.json": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {}}'),
                              "tokenizer.json"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_folder_is_one_line(case, tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("bert"), tmp_path / "model")
    damage, expected = BROKEN[case]
    damage(folder)
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and expected in message, message


def test_a_task_head_and_a_missing_pooler_are_allowed(tmp_path, tokenizer):
    """bert-base-uncased and roberta-base are saved with heads and without poolers: normal."""
    from transformers import BertForMaskedLM

    from conftest import TINY_CONFIGS

    BertForMaskedLM(TINY_CONFIGS["bert"]()).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").num_layers == 2


def test_vision_model_with_tokenizer_files_is_one_line(tmp_path, tokenizer):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="does not take token ids"):
        load_model(str(tmp_path), device="cpu")


def test_broken_model_through_the_cli_is_one_line(tiny_model_dir, tmp_path):
    from conftest import invoke, write_job

    folder = _copy(tiny_model_dir("bert"), tmp_path / "model")
    _config(folder, num_hidden_layers=4)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "The river ran past the mill."}\n')
    result = invoke("run", write_job(tmp_path, corpus, folder, device="cpu"), "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "encoder.layer.2." in result.output
    assert not (tmp_path / "out").exists()


def test_models_load_in_threads_with_their_heads_tied(tiny_model_dir):
    """transformers swaps PreTrainedModel.tie_weights for a no-op while it builds a model, so
    loads in two threads untie each other's heads and can leave the no-op in place for the whole
    process (4 threads x 15 loads of a tied GPT-2 without the lock: 60 of 60 missing lm_head).
    Dask workers with several threads load in threads; model.LOADING serialises every load."""
    import threading

    from transformers.modeling_utils import PreTrainedModel

    from attnpipe.model import load_model

    folder, errors = tiny_model_dir("gpt2"), []

    def work():
        for _ in range(3):
            try:
                lm = load_model(str(folder), device="cpu", language_model=True)
                assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight
            except Exception as exc:  # noqa: BLE001 - collected and shown below
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert PreTrainedModel.tie_weights.__qualname__ == "PreTrainedModel.tie_weights"
