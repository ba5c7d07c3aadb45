"""Attention of plain torch modules (pipeline/capture/modules.py, pipeline/factory.py).

nn.TransformerEncoder and a bare nn.MultiheadAttention compute exactly what they compute without
attnpipe (torch.equal), batch_first or not, with padding and with a causal mask; their captured
weights equal torch's own per-head weights. Through `attnpipe run` with a factory written to
tmp_path, a tiny nn.TransformerEncoder and a tutorial-style multi-head attention module store
dense per-head maps equal to softmax(q k^T / sqrt(d)) computed here by hand from the modules'
projection weights (1e-5), with padding in the batch.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import textwrap
from pathlib import Path

import pytest
import torch

from attnpipe.capture import capture_layers
from attnpipe.capture.modules import find_sites, wrapped
from attnpipe.errors import JobError, ModelError
from attnpipe.job import build_job
from attnpipe.read import open_dataset
from attnpipe.windows import collate, tokenize

from conftest import invoke

ATOL = 1e-5
TEXTS = ["The animal didn't cross the street because it was too tired.",
         "Short one.",
         "A somewhat longer sentence, with commas, numbers like 42, and a question at the end?"]

# The factory module the tests write into tmp_path: what a user writes (README's example).
FACTORY = '''
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from attnpipe.model import builtin_model_dir


class TinyEncoder(nn.Module):
    """Token and position embeddings, then a 2-layer nn.TransformerEncoder."""

    max_length = 64  # its position table

    def __init__(self, batch_first=True, causal=False, norm_first=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first, self.causal = batch_first, causal
        self.embed = nn.Embedding(30522, 16)
        self.pos = nn.Embedding(self.max_length, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=not norm_first)

    def forward(self, input_ids, attention_mask):
        n = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(n, device=input_ids.device))
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        x = x if self.batch_first else x.transpose(0, 1)
        return self.encoder(x, mask=mask, src_key_padding_mask=attention_mask == 0, is_causal=self.causal)


class SelfAttention(nn.Module):
    """Multi-head self-attention as the tutorials write it: returns (output, weights)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        weights = scores.softmax(dim=-1)
        self.last_weights = weights
        return self.o((weights @ v).transpose(1, 2).reshape(b, n, d)), weights


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, attention_mask):
        out, _ = self.attn(self.norm(x), attention_mask)
        return x + out


class TinyCustom(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30522, 16)
        self.blocks = nn.ModuleList(Block(16, 4) for _ in range(2))

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return x


class EncoderDecoder(nn.Module):
    """nn.Transformer over the same tokens on both sides: encoder self, decoder self, cross."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30522, 16)
        self.transformer = nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=2,
                                                dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, input_ids, attention_mask):
        x, pad = self.embed(input_ids), attention_mask == 0
        return self.transformer(x, x, src_key_padding_mask=pad, tgt_key_padding_mask=pad,
                                memory_key_padding_mask=pad)


def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_dir())


def encoder():
    return TinyEncoder(), tokenizer()


def encoder_decoder():
    return EncoderDecoder(), tokenizer()


def seeded():
    """The weights a file beside this module says: a factory whose weights change between runs."""
    seed = int(Path(__file__).with_name("seed.txt").read_text())
    return TinyEncoder(seed=seed), tokenizer()


def causal_encoder():
    return TinyEncoder(batch_first=False, causal=True), tokenizer()


def custom():
    return TinyCustom(), tokenizer()


def no_attention():
    return nn.Sequential(nn.Embedding(30522, 16)), tokenizer()
'''


def write_factory(folder: Path) -> str:
    """The factory module in `folder` under a name of its own (imported modules are cached)."""
    name = "attn_factory_" + "".join(c if c.isalnum() else "_" for c in folder.name)
    (folder / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    return name


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """The factory module, imported, for the tests that build its models directly."""
    folder = tmp_path_factory.mktemp("kit")
    name = write_factory(folder)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(tok):
    windows = tokenize(tok, TEXTS, max_length=64, stride=8)
    ids, mask = collate(windows, tok.pad_token_id)
    assert (mask == 0).any(), "the batch must contain padding"
    return ids, mask


def captured_run(model, ids, mask, patterns=()):
    """(the model's output under capture, [LayerInputs]) and nothing left on the model after."""
    seen = []
    sites = find_sites(model, list(patterns))
    with torch.inference_mode(), capture_layers(seen.append, model=model), wrapped(sites, mask):
        out = model(input_ids=ids, attention_mask=mask)
    return out, seen


# --- bit for bit -------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first,causal,norm_first", [(True, False, False), (False, False, False),
                                                        (True, True, False), (False, True, False),
                                                        (True, False, True)])
def test_encoder_output_unchanged(kit, batch_first, causal, norm_first):
    tok = kit.tokenizer()
    model = kit.TinyEncoder(batch_first=batch_first, causal=causal, norm_first=norm_first).eval()
    reference = copy.deepcopy(model)
    ids, mask = batch(tok)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask)
    out, seen = captured_run(model, ids, mask)
    assert torch.equal(out, expected)
    assert [i.site.layer for i in seen] == [0, 1] and {i.site.kind for i in seen} == {"self"}
    for inputs in seen:
        probs = inputs.given
        assert probs.shape == (len(TEXTS), 4, ids.shape[1], ids.shape[1])
        valid = mask.bool()
        assert (probs.masked_select(~valid[:, None, None, :]) == 0).all()  # no weight on padding
        if causal:
            assert (probs.triu(1) == 0).all()


class BareMHA(torch.nn.Module):
    """An nn.MultiheadAttention called directly, as the docs show, with need_weights=False."""

    def __init__(self, batch_first: bool, causal: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30522, 16)
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.batch_first, self.causal = batch_first, causal

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        x = x if self.batch_first else x.transpose(0, 1)
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1) if self.causal else None
        return self.attn(x, x, x, key_padding_mask=attention_mask == 0, attn_mask=causal,
                         need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_output_unchanged_and_weights_per_head(kit, batch_first, causal):
    model = BareMHA(batch_first, causal).eval()
    reference = copy.deepcopy(model)
    ids, mask = batch(kit.tokenizer())
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask)
        x = reference.embed(ids)
        x = x if batch_first else x.transpose(0, 1)
        n = ids.shape[1]
        _, weights = reference.attn(x, x, x, key_padding_mask=mask == 0, need_weights=True,
                                    attn_mask=torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None,
                                    average_attn_weights=False)  # torch's own per-head weights
    out, seen = captured_run(model, ids, mask)
    assert torch.equal(out, expected)
    assert len(seen) == 1 and seen[0].site.layer == 0
    torch.testing.assert_close(seen[0].given, weights, atol=ATOL, rtol=0)


def test_transformer_sites_and_output(kit):
    model = kit.EncoderDecoder().eval()
    reference = copy.deepcopy(model)
    ids, mask = batch(kit.tokenizer())
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask)
    out, seen = captured_run(model, ids, mask)
    assert torch.equal(out, expected)
    keys = [(i.site.stack, i.site.layer, i.site.kind) for i in seen]
    assert keys == [("encoder", 0, "self"), ("encoder", 1, "self"), ("decoder", 0, "self"), ("decoder", 0, "cross"),
                    ("decoder", 1, "self"), ("decoder", 1, "cross")]
    for inputs in seen:
        assert inputs.given.shape == (len(TEXTS), 4, ids.shape[1], ids.shape[1])
        assert (inputs.given.masked_select((mask == 0)[:, None, None, :]) == 0).all()


class AveragedMHA(torch.nn.Module):
    """A model that asks nn.MultiheadAttention for its weights (averaged over heads) or not."""

    def __init__(self, need_weights: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30522, 16)
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        return self.attn(x, x, x, key_padding_mask=attention_mask == 0, need_weights=self.need_weights)


def test_pattern_reads_one_head_weights(kit):
    """A pattern wins over the automatic capture; (batch, query_pos, key_pos) weights are one head."""
    model = AveragedMHA(need_weights=True).eval()
    ids, mask = batch(kit.tokenizer())
    out, seen = captured_run(model, ids, mask, [("attn", ("output", (("item", 1),)))])
    assert len(seen) == 1 and seen[0].given.shape == (len(TEXTS), 1, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(seen[0].given, out[1][:, None], atol=ATOL, rtol=0)


def test_weights_not_formed_one_line(kit):
    model = AveragedMHA(need_weights=False).eval()
    ids, mask = batch(kit.tokenizer())
    with pytest.raises(ModelError, match=r"attn \(MultiheadAttention\).*is NoneType \(the module did not form"):
        captured_run(model, ids, mask, [("attn", ("output", (("item", 1),)))])


def test_instance_forward_kept(kit):
    model = AveragedMHA(need_weights=True).eval()
    own = model.attn.forward
    model.attn.forward = own  # a forward set on the instance survives the capture
    ids, mask = batch(kit.tokenizer())
    captured_run(model, ids, mask)
    assert vars(model.attn)["forward"] is own


# --- through attnpipe run ----------------------------------------------------------------------

DENSE = '[[recipes]]\nname = "dense"\nmax_tokens = 64\nper_head = true\n'


def run_factory(tmp_path: Path, function: str, extra: str = "", recipes: str = DENSE, allow: bool = True):
    module = write_factory(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(TEXTS)))
    job = tmp_path / "job.toml"
    job.write_text(f'name = "mods"\n[corpus]\npath = "corpus.jsonl"\nid_column = "id"\n'
                   f'[model]\nfactory = "{module}:{function}"\n' + ("allow_code = true\n" if allow else "")
                   + f"max_length = 64\nstride = 8\n{extra}\n"
                   f'[run]\noutput = "{tmp_path / "out"}"\nprogress = false\ndevice = "cpu"\nweight_dtype = "float32"\n{recipes}')
    return invoke("run", job, "--quiet"), module


def stored_maps(out: Path, doc_id: str, layer: int) -> torch.Tensor:
    """(head, query_pos, key_pos) of one document's window 0 from the maps table."""
    ds = open_dataset(out)
    rows = ds.to_pandas("maps", {"doc_id": doc_id, "layer": layer})
    n = int(rows["query_pos"].max()) + 1
    maps = torch.zeros(int(rows["head"].max()) + 1, n, n)
    for head, q, w in zip(rows["head"], rows["query_pos"], rows["weights"]):
        maps[head, q, :len(w)] = torch.tensor(w, dtype=torch.float32)
    return maps


def by_hand(x: torch.Tensor, w_q, b_q, w_k, b_k, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) of one unpadded sequence x (pos, dim): (head, pos, pos)."""
    n, d = x.shape
    q = (x @ w_q.T + b_q).view(n, heads, d // heads).transpose(0, 1)
    k = (x @ w_k.T + b_k).view(n, heads, d // heads).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)


def doc_ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def test_run_transformer_encoder_factory(tmp_path, kit):
    result, _ = run_factory(tmp_path, "encoder", recipes='[[recipes]]\nname = "dense"\nmax_tokens = 64\n'
                            'per_head = true\n[[recipes]]\nname = "head_stats"\n')
    assert result.exit_code == 0, result.output
    model, tok = kit.encoder()
    model.eval()
    for i, text in enumerate(TEXTS):
        ids = doc_ids(tok, text)  # alone: no padding, while the run's batch had some
        with torch.no_grad():
            x = model.embed(ids) + model.pos(torch.arange(ids.shape[1]))
            for layer, block in enumerate(model.encoder.layers):
                attn, e = block.self_attn, 16
                w, b = attn.in_proj_weight, attn.in_proj_bias
                expected = by_hand(x[0], w[:e], b[:e], w[e:2 * e], b[e:2 * e], heads=4)
                torch.testing.assert_close(stored_maps(tmp_path / "out", f"d{i}", layer), expected,
                                           atol=ATOL, rtol=0)
                x = block(x)
    ds = open_dataset(tmp_path / "out")
    assert len(ds.to_pandas("head_stats")) > 0


def test_run_custom_module(tmp_path, kit):
    patterns = '[[model.attention_modules]]\npattern = "blocks.*.attn"\nweights = "output[1]"\n'
    result, _ = run_factory(tmp_path, "custom", extra=patterns)
    assert result.exit_code == 0, result.output
    model, tok = kit.custom()
    model.eval()
    for i, text in enumerate(TEXTS):
        ids = doc_ids(tok, text)
        with torch.no_grad():
            x = model.embed(ids)
            for layer, block in enumerate(model.blocks):
                a = block.attn
                h = block.norm(x)[0]
                expected = by_hand(h, a.q.weight, a.q.bias, a.k.weight, a.k.bias, heads=4)
                torch.testing.assert_close(stored_maps(tmp_path / "out", f"d{i}", layer), expected,
                                           atol=ATOL, rtol=0)
                x = block(x, torch.ones_like(ids))


def test_run_custom_module_attribute(tmp_path):
    patterns = '[[model.attention_modules]]\npattern = "blocks.*.attn"\nweights = "module.last_weights"\n'
    result, _ = run_factory(tmp_path, "custom", extra=patterns)
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "out")
    assert set(ds.to_pandas("maps")["layer"]) == {0, 1}


def test_python_run_of_a_factory_job(tmp_path):
    """attnpipe.run() of a JobSpec: its dump names the default model.name, which is no conflict."""
    import attnpipe
    from attnpipe.job import load_job

    result, _ = run_factory(tmp_path, "encoder", allow=False)
    job = load_job(tmp_path / "job.toml", overrides={"model.allow_code": True})
    ds = attnpipe.run(job, quiet=True, run__output=str(tmp_path / "again"))
    assert ds.provenance["attention_backend"] == "attnpipe(modules)"


def test_transformer_through_run(tmp_path):
    """nn.Transformer over one text: both stacks' self-attention stored; its cross-attention needs
    a target text, which a factory model is not given."""
    result, _ = run_factory(tmp_path, "encoder_decoder", recipes='[[recipes]]\nname = "head_stats"\n')
    assert result.exit_code == 0, result.output
    rows = open_dataset(tmp_path / "out").to_pandas("head_stats")
    assert sorted(set(zip(rows["stack"], rows["attention"], rows["layer"]))) == [
        ("decoder", "self", 0), ("decoder", "self", 1), ("encoder", "self", 0), ("encoder", "self", 1)]


def test_causal_encoder_through_run(tmp_path):
    result, _ = run_factory(tmp_path, "causal_encoder")
    assert result.exit_code == 0, result.output
    rows = open_dataset(tmp_path / "out").to_pandas("maps")
    assert all(len(w) == q + 1 for q, w in zip(rows["query_pos"], rows["weights"]))  # causal: keys 0..q


def test_rerun_refuses_other_weights(tmp_path):
    """The factory's weights are identified (sha256 of the state_dict) like a folder's."""
    (tmp_path / "seed.txt").write_text("0")
    result, module = run_factory(tmp_path, "seeded", recipes='[[recipes]]\nname = "head_stats"\n')
    assert result.exit_code == 0, result.output
    job = tmp_path / "job.toml"
    job.write_text(job.read_text().replace("[run]", "[run]\nnum_shards = 3"))
    (tmp_path / "out").rename(tmp_path / "first")  # then a run that stops short (--limit 2)
    assert invoke("run", job, "--quiet", "--limit", "2").exit_code == 0
    (tmp_path / "seed.txt").write_text("1")
    one_line(invoke("run", job, "--quiet"), "weights changed")


# --- refusals: one line each -------------------------------------------------------------------

def one_line(result, *words):
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for word in words:
        assert word in line, line


def test_factory_needs_allow_code(tmp_path):
    result, _ = run_factory(tmp_path, "encoder", allow=False)
    one_line(result, "model.allow_code", "model.factory")
    assert not (tmp_path / "out").exists()


def test_uncapturable_model(tmp_path):
    result, _ = run_factory(tmp_path, "no_attention")
    one_line(result, "Sequential", "nn.MultiheadAttention", "model.attention_modules")


def test_pattern_matching_nothing(tmp_path):
    patterns = '[[model.attention_modules]]\npattern = "layers.*.attn"\nweights = "output[1]"\n'
    result, _ = run_factory(tmp_path, "custom", extra=patterns)
    one_line(result, "layers.*.attn", "blocks.0.attn")


def test_weights_never_formed(tmp_path):
    patterns = '[[model.attention_modules]]\npattern = "blocks.*.attn"\nweights = "module.missing"\n'
    result, _ = run_factory(tmp_path, "custom", extra=patterns)
    one_line(result, "blocks.0.attn", "module.missing", "missing")


@pytest.mark.parametrize("weights,words", [("output", ["blocks.0 (Block)", "rows sum to", "softmax"]),
                                           ("output.shape", ["blocks.0 (Block)", "not a tensor"])])
def test_weights_not_probabilities(tmp_path, weights, words):
    patterns = f'[[model.attention_modules]]\npattern = "blocks.*"\nweights = "{weights}"\n'
    result, _ = run_factory(tmp_path, "custom", extra=patterns)
    one_line(result, *words)


def test_missing_module_and_function(tmp_path):
    for spec, words in (("nowhere_mod:build", ("no module nowhere_mod", str(tmp_path))),):
        job = {"corpus": {"path": "c.txt"}, "model": {"factory": spec, "allow_code": True}}
        from attnpipe.model import load_model

        spec_job = build_job(job, base_dir=tmp_path)
        with pytest.raises(ModelError) as err:
            load_model("x", base_dir=tmp_path, factory=spec_job.model.factory, allow_code=True)
        for word in words:
            assert word in str(err.value)
    module = write_factory(tmp_path)
    with pytest.raises(ModelError, match="has no function nothing"):
        load_model("x", base_dir=tmp_path, factory=f"{module}:nothing", allow_code=True)


@pytest.mark.parametrize("model,words", [
    ({"factory": "not a spec", "allow_code": True}, ["model.factory", "package.module:function"]),
    ({"factory": "m:f"}, ["model.allow_code = true"]),
    ({"factory": "m:f", "allow_code": True, "name": "bert"}, ["model.name", "model.factory"]),
    ({"attention_modules": [{"pattern": "a.*", "weights": "output[1]"}]}, ["model.attention_modules", "factory"]),
    ({"factory": "m:f", "allow_code": True, "attention_modules": [{"pattern": "a..b", "weights": "output[1]"}]},
     ["model.attention_modules[0].pattern"]),
    ({"factory": "m:f", "allow_code": True, "attention_modules": [{"pattern": "a.*", "weights": "attr:w"}]},
     ["model.attention_modules[0].weights", "module.NAME"]),
])
def test_job_keys_refused(model, words):
    with pytest.raises(JobError) as err:
        build_job({"corpus": {"path": "c.txt"}, "model": model})
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_nothing_stays_on_the_model(kit):
    model = kit.TinyCustom()
    sites = find_sites(model, [("blocks.*.attn", ("output", (("item", 1),)))])
    assert [s.name for s in sites] == ["blocks.0.attn", "blocks.1.attn"]
    ids, mask = batch(kit.tokenizer())
    with wrapped(sites, mask):
        assert "forward" in vars(sites[0].module)
    assert "forward" not in vars(sites[0].module)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_modules_never_called(kit):
    """Modules that a forward pass never calls: one line naming the class and what was tried."""
    from attnpipe.factory import ModuleModel

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(30522, 16)
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, input_ids, attention_mask):  # attention by other means: nothing formed
            x = self.embed(input_ids)
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    with pytest.raises(ModelError) as err:
        ModuleModel(Unused(), kit.tokenizer(), "mine:build", torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "Unused" in message and "attn (nn.MultiheadAttention)" in message, message
