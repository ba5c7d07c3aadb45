"""One exception base class with small subclasses, one per layer of the data flow.

The CLI turns any `AttnpipeError` into a one-line message and a non-zero exit; anything else is a
bug and keeps its traceback.
"""


class AttnpipeError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class JobError(AttnpipeError):
    """The job file or a CLI override is invalid (unknown key, wrong type, bad value)."""


class CorpusError(AttnpipeError):
    """The corpus cannot be read: missing file, unknown column, empty corpus, bad encoding."""


class ModelError(AttnpipeError):
    """The model or tokenizer cannot be loaded or is not supported."""


class RecipeError(AttnpipeError):
    """A recipe name or parameter is invalid."""


class OutputError(AttnpipeError):
    """The output directory is unusable, or holds a different job's data."""


class ReadError(AttnpipeError):
    """A dataset cannot be read as asked: unknown table, document, layer or head, or a missing
    optional dependency of a read-side command."""


class QueryError(ReadError):
    """A SQL query was refused (it is not read-only, or reads outside the dataset) or failed."""
