"""attnpipe: corpus-scale attention datasets from Hugging Face transformers.

The data flows through the modules in this order:
corpus -> windows/batches -> model capture -> recipes -> writer -> manifest.
"""

__version__ = "0.2.0"


def __getattr__(name: str):
    # `from attnpipe import open_dataset` without importing the read side (or torch) up front.
    if name in ("open_dataset", "AttnDataset"):
        from . import read

        return getattr(read, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
