"""attnpipe: corpus-scale attention datasets from Hugging Face transformers.

    import attnpipe
    att = attnpipe.attend("The animal didn't cross the street because it was too tired.")
    ds = attnpipe.run("jobs/demo.toml")          # a batch job; returns the dataset it wrote
    ds = attnpipe.open_dataset("out/demo")       # read a dataset (no torch imported)

The data flows through the modules in this order:
corpus -> windows/batches -> model capture -> recipes -> writer -> manifest.
"""

__version__ = "0.4.0"

# Imported on first use, so that `import attnpipe` (and the read side) stays free of torch.
_LAZY = {"open_dataset": ".read", "AttnDataset": ".read", "attend": ".api", "run": ".api",
         "AttnpipeError": ".errors"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
