"""attnpipe: corpus-scale attention datasets from Hugging Face transformers.

The data flows through the modules in this order:
corpus -> windows/batches -> model capture -> recipes -> writer -> manifest.
"""

__version__ = "0.2.0"
