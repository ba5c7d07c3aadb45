"""Shared fixtures: tiny random-init models built from configs in memory (no downloads, no GPU).

Every tiny model uses the embedded MiniLM tokenizer (BERT WordPiece, offline); the model's own
architecture is what the capture and recipe tests care about.
"""

from __future__ import annotations

import os

# Before transformers/huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# attnpipe's own caches (corpus, verified files, mirrored URLs) in a folder of this test session,
# never in the user's home.
if "ATTNPIPE_CACHE" not in os.environ:
    import tempfile

    os.environ["ATTNPIPE_CACHE"] = tempfile.mkdtemp(prefix="attnpipe-test-cache-")

import copy  # noqa: E402
from pathlib import Path

import pytest
import torch
from transformers import (AutoModel, AutoTokenizer, BartConfig, BertConfig, GPT2Config,
                          LlamaConfig, T5Config)

from attnpipe.model import LoadedModel, builtin_model_dir


VOCAB = 30522  # the MiniLM tokenizer's vocabulary
SHARED = Path(__file__).resolve().parents[2] / "shared"

TINY_CONFIGS = {
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    # Grouped-query attention: 4 query heads share 2 key/value heads; RoPE positions.
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # decoder_start_token_id: real T5 checkpoints set it in config.json (the pad id, 0).
    "t5": lambda: T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           decoder_start_token_id=0),
    "bart": lambda: BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=128),
}
ARCHS = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_dir())


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModel.from_config(TINY_CONFIGS[arch](), attn_implementation="eager").eval()


def eager_attentions(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The reference: HF eager with output_attentions=True, one (batch, head, q, k) map per layer."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    run = reference.get_encoder() if reference.config.is_encoder_decoder else reference
    with torch.no_grad():
        out = run(input_ids=ids, attention_mask=mask, output_attentions=True)
    return list(out.attentions)


def loaded(arch: str, tokenizer, seed: int = 0) -> tuple[LoadedModel, torch.nn.Module]:
    """(LoadedModel for capture, an untouched copy of the same weights for the reference)."""
    model = tiny_model(arch, seed)
    reference = copy.deepcopy(model)
    return LoadedModel(model, tokenizer, f"tiny-{arch}", torch.device("cpu")), reference


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def minilm():
    from attnpipe.model import load_model

    return load_model("all-MiniLM-L6-v2", device="cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_shared = pytest.mark.skip(reason="../shared is not beside the repo")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "shared" in item.keywords and not SHARED.is_dir():
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """save_pretrained() folders of tiny models (safetensors + tokenizer), by architecture."""
    made = {}

    def make(arch: str = "bert") -> Path:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_model(arch).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def data(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The read-side datasets of tests/readkit.py, written once per session: {"dense", "sparse"}."""
    import readkit

    return readkit.datasets(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="session")
def dense(data):
    from attnpipe.read import open_dataset

    return open_dataset(data["dense"])


@pytest.fixture(scope="session")
def sparse(data):
    from attnpipe.read import open_dataset

    return open_dataset(data["sparse"])


def invoke(*args):
    """`attnpipe ARGS` in this process (click's test runner); arguments may be paths."""
    from click.testing import CliRunner

    from attnpipe.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def write_job(tmp_path: Path, corpus: Path | str, model: Path | str = "all-MiniLM-L6-v2",
              recipes: str = '[[recipes]]\nname = "head_stats"\n', extra: str = "", **run) -> Path:
    """A job file in tmp_path; `run` keys go to [run] (output defaults to tmp_path/out)."""
    run.setdefault("output", str(tmp_path / "out"))
    run.setdefault("progress", False)
    lines = ['name = "test"', "[corpus]", f'path = "{corpus}"', extra, "[model]", f'name = "{model}"',
             "max_length = 64", "stride = 8", "[run]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in run.items()]
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n" + recipes)
    return path


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def error_line(result) -> str:
    """The error a user sees from a CLI result: exit 1, exactly one 'Error:' line, which is the
    last line, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def one_line_error(result) -> str:
    """`error_line`, with nothing else printed."""
    line = error_line(result)
    assert len([x for x in result.output.splitlines() if x.strip()]) == 1, result.output
    return line


def raises_one_line(kind: type, call, *args, **kwargs) -> str:
    """The message of the error `call` raises: of type `kind`, one line."""
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message

