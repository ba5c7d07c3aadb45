"""Datasets in a notebook: the report's interactive head view, inline.

The view is the report's own page (styles, script and data inlined, a Content-Security-Policy
that forbids any request) placed in a sandboxed iframe through `srcdoc`, so it renders the same
in Jupyter, JupyterLab and VS Code without touching the notebook's page, and corpus text in it
is escaped twice over (inside the page, and as the attribute that carries the page).
"""

from __future__ import annotations

import html
import shutil
import weakref
from pathlib import Path

from .dataset import AttnDataset
from .report import ASSETS, CSP, _head_view_section, choose_documents, head_view_data


def head_view_page(ds: AttnDataset, docs: list[str] | None = None, count: int = 5) -> str:
    """A standalone HTML page with the head view of `docs` (default: the first `count`)."""
    doc_ids = choose_documents(ds, docs, count)
    css = (ASSETS / "report.css").read_text(encoding="utf-8")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><style>{css}</style></head>'
            f'<body><main>{_head_view_section(head_view_data(ds, doc_ids))}</main></body></html>')


class HeadView:
    """What `ds.view()` returns: displays itself in Jupyter; `.html` is the page, `.save(path)`."""

    def __init__(self, page: str, height: int = 620):
        self.html, self.height = page, height

    def _repr_html_(self) -> str:
        return (f'<iframe sandbox="allow-scripts" srcdoc="{html.escape(self.html, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:1px solid #ddd"></iframe>')

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path


class Attention(AttnDataset):
    """The result of `attnpipe.attend()`: a dataset in a private temporary folder, removed by
    `close()` or when the object is garbage-collected."""

    def __init__(self, path: Path, cleanup: Path):
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(cleanup), True)
        super().__init__(path)

    def __repr__(self) -> str:
        tables = ", ".join(f"{t} ({v['rows']:,} rows)" for t, v in self.tables.items() if t != "documents")
        texts = self.tables.get("documents", {}).get("rows", 0)
        return f"Attention({texts} texts, model {self.provenance.get('model')!r}: {tables})"

    def close(self) -> None:
        super().close()
        self._finalizer()
