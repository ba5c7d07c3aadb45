"""Models that are not transformers models: `[model] factory = "package.module:function"`.

The contract (README, "Models that are not transformers models"):
- `function()` takes no arguments and returns `(model, tokenizer)`;
- `model` is a `torch.nn.Module`, called as `model(input_ids=..., attention_mask=...)` with
  (batch, pos) int64 tensors, attention_mask 1 on tokens and 0 on right padding; its output is
  not used. An int attribute `model.max_length`, if any, is the longest window it takes;
- `tokenizer` is a transformers fast tokenizer (character offsets place every token in its text).

Its attention is captured from its modules (pipeline/capture/modules.py): every
nn.MultiheadAttention and nn.TransformerEncoderLayer, and the modules the job names in
[[model.attention_modules]]. A factory that returns a transformers model is captured like one
loaded by name. The module is imported from sys.path, then from the job's folder.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from . import capture
from .capture import modules
from .errors import ModelError
from .model import DTYPES, LOADING, LoadedModel, _check_tokenizer, pick_device

MAX_WINDOW = 4096  # as for transformers models without a declared maximum


@dataclass
class ModuleModel(LoadedModel):
    """A LoadedModel around a plain torch module: its attention modules are wrapped for each
    forward pass (nothing stays on the model between passes)."""

    patterns: list = field(default_factory=list)  # [(pattern, weights path)] from the job

    def __post_init__(self):
        if self.backend not in ("auto", "eager"):
            raise ModelError(f"run.attention = {self.backend!r} applies to transformers models; {self.name} "
                             f"({type(self.model).__name__}) forms its attention in its own modules; leave "
                             "run.attention out")
        self.backend, self.kernels, self.cpu_kernel = "eager", None, False  # weights formed as the model runs, as eager
        self.model.eval().to(self.device, DTYPES[self.dtype])
        self.sites = modules.find_sites(self.model, self.patterns)
        if not self.sites:
            raise ModelError(self.uncaptured("it has no nn.MultiheadAttention or nn.TransformerEncoderLayer, "
                                             "and the job names no [[model.attention_modules]]"))
        self._describe()

    @property
    def backend_name(self) -> str:
        return f"{capture.BACKEND}(modules)"

    def uncaptured(self, why: str) -> str:
        return (f"{self.name}: the attention of {type(self.model).__name__} cannot be captured: {why}; name the "
                "module that computes attention in [[model.attention_modules]] with where its weights are "
                "(README, \"Models that are not transformers models\")")

    def nothing_captured(self) -> str:
        """A forward pass that called none of the modules found: say which they were."""
        hows = {"mha": "nn.MultiheadAttention", "encoder_layer": "nn.TransformerEncoderLayer"}
        names = [f"{s.name} ({hows.get(s.how, f'pattern {s.pattern!r}')})" for s in self.sites[:3]]
        tried = ", ".join(names) + (", ..." if len(self.sites) > 3 else "")
        return self.uncaptured(f"a forward pass called none of {tried}")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        with modules.wrapped(self.sites, attention_mask), warnings.catch_warnings():
            # nn.TransformerEncoder's fast path warns on every new process; not the user's concern
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
            self.model(input_ids=input_ids, attention_mask=attention_mask)

    def _probe(self) -> tuple[bool, int, int]:
        try:
            return super()._probe()
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's model; --debug shows the traceback
            text = str(exc).strip().splitlines()
            raise ModelError(f"{self.name}: {type(self.model).__name__}(input_ids=..., attention_mask=...) raised "
                             f"{type(exc).__name__}: {text[0] if text else ''}") from exc

    @cached_property
    def max_length(self) -> int:
        limits = [getattr(self.model, "max_length", None), self.tokenizer.model_max_length, MAX_WINDOW]
        return min(x for x in limits if isinstance(x, int) and x > 0)

    @cached_property
    def default_window(self) -> tuple[int, str]:
        return self.max_length, "the model's maximum"


def load_factory_model(spec: str, *, base_dir: Path, dtype: str = "float32", device: str = "auto",
                       patterns: list | None = None, backend: str = "auto") -> LoadedModel:
    """Build the job's model with its factory. Raises ModelError."""
    target = pick_device(device)
    model, tokenizer = call_factory(spec, base_dir)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ModelError(f"model.factory {spec}: returned a tokenizer of type {type(tokenizer).__name__}; attnpipe "
                         "needs a transformers fast tokenizer (PreTrainedTokenizerFast) for character offsets")
    _check_tokenizer(tokenizer, model, spec, spec)
    provenance = {"source": f"factory {spec}", "factory": spec, "weights_sha256": state_sha256(model)}
    if isinstance(model, PreTrainedModel) and not patterns:
        return LoadedModel(model.to(DTYPES[dtype]), tokenizer, spec, target, dtype, provenance, backend)
    return ModuleModel(model, tokenizer, spec, target, dtype, provenance, backend, patterns or [])


def call_factory(spec: str, base_dir: Path) -> tuple[torch.nn.Module, object]:
    module_name, _, function_name = spec.partition(":")
    module = _import(module_name, base_dir, spec)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelError(f"model.factory {spec}: {module_name} ({module.__file__}) has no function {function_name}")
    try:
        with LOADING:  # a factory may call from_pretrained (model.LOADING)
            made = function()
    except Exception as exc:  # noqa: BLE001 - the user's code; --debug shows the traceback
        raise ModelError(f"model.factory {spec} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        got = type(made).__name__ + (f" of {len(made)}" if isinstance(made, tuple) else "")
        raise ModelError(f"model.factory {spec} returned {got}; it must return (model, tokenizer), the model "
                         "a torch.nn.Module")
    return made


def _import(module_name: str, base_dir: Path, spec: str):
    with _on_path(base_dir):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise ModelError(f"model.factory {spec}: no module {module_name} on sys.path or in the job's "
                                 f"folder {base_dir}") from None
            raise ModelError(f"model.factory {spec}: importing {module_name} failed: {_first_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - the user's module ran and raised
            raise ModelError(f"model.factory {spec}: importing {module_name} raised "
                             f"{type(exc).__name__}: {_first_line(exc)}") from exc


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """The job's folder after sys.path while the factory's module is imported: installed
    packages keep their names."""
    entry = str(Path(folder).resolve())
    added = entry not in sys.path
    if added:
        sys.path.append(entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (name, then bytes, in name order): what
    identifies its weights, so a rerun refuses a factory that now builds other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
