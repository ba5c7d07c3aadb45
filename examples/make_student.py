"""Make a distillation student from the embedded all-MiniLM-L6-v2: its first N layers.

    python examples/make_student.py [FOLDER] [--layers 3]

The student keeps the teacher's embeddings, tokenizer and the first N transformer layers
(weights copied, nothing trained): the usual starting point of layer-dropping distillation, and
a real second model for `attnpipe study distill` (jobs/distill-student.toml reads FOLDER,
default out/minilm-l3, run from the repository root). Offline: the teacher is the copy installed with attnpipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

from attnpipe.model import builtin_model_dir


def make_student(folder: Path, layers: int) -> Path:
    """Save the teacher's first `layers` layers (and its tokenizer) into `folder`."""
    teacher_dir = builtin_model_dir()
    model = AutoModel.from_pretrained(teacher_dir)
    if not 1 <= layers <= model.config.num_hidden_layers:
        raise SystemExit(f"--layers {layers}: the teacher has {model.config.num_hidden_layers} layers")
    model.encoder.layer = model.encoder.layer[:layers]  # BERT's layers are an nn.ModuleList
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="out/minilm-l3")
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    print(f"wrote {make_student(Path(args.folder), args.layers)}")


if __name__ == "__main__":
    main()
