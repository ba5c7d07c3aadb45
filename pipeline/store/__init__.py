"""Storage: declared schemas, output paths, the streaming writer, commit records and the lock.

Readers list files from the commit records (`committed_files`), never by globbing folders.
"""

from .commit import committed_files, read_records
from .schema import load_schemas, table_schema

__all__ = ["committed_files", "read_records", "load_schemas", "table_schema"]
