"""`_manifest.json`: the job, its provenance, and each finished shard with its row counts.

A shard counts as done only once it is recorded here. Files of shards that are not recorded
(a run that crashed between renames) are deleted before a run starts, so a rerun never mixes
half a shard into the data.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import __version__
from .errors import OutputError
from .paths import STAGING, manifest_path, shard_name

FORMAT_VERSION = 1


class Manifest:
    def __init__(self, out: Path, data: dict):
        self.out, self.data = Path(out), data

    @classmethod
    def open(cls, out: Path, job_dict: dict, fingerprint: str) -> "Manifest":
        """Load the manifest of `out`, or start one. Refuse an output dir of a different job."""
        out = Path(out)
        path = manifest_path(out)
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise OutputError(f"{path} is not valid JSON ({exc}); move the folder away") from None
            if data.get("job_fingerprint") != fingerprint:
                raise OutputError(f"{out} holds the output of a different job (fingerprint "
                                  f"{data.get('job_fingerprint')}, this job {fingerprint}); "
                                  "choose another --output or delete the folder")
        elif out.exists() and any(p for p in out.iterdir() if p.name != STAGING):
            raise OutputError(f"{out} exists, is not empty and has no {path.name}; "
                              "choose another --output")
        else:
            data = {"format_version": FORMAT_VERSION, "attnpipe_version": __version__,
                    "job_fingerprint": fingerprint, "job": job_dict, "status": "running",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": {}}
        manifest = cls(out, data)
        manifest.remove_unrecorded()
        return manifest

    def complete(self, shard: int) -> bool:
        return str(shard) in self.data["shards"]

    def remove_unrecorded(self) -> None:
        shutil.rmtree(self.out / STAGING, ignore_errors=True)
        done = {shard_name(int(s)) for s in self.data["shards"]}
        for f in self.out.glob("*/**/shard-*.parquet"):
            if f.stem not in done:
                f.unlink()

    def record(self, shard: int, info: dict) -> None:
        self.data["shards"][str(shard)] = info
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = manifest_path(self.out)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)

    def totals(self) -> dict:
        shards = self.data["shards"].values()
        keys = ("documents", "empty_documents", "windows", "tokens")
        out = {k: sum(s.get(k, 0) for s in shards) for k in keys}
        rows: dict[str, int] = {}
        for s in shards:
            for table, n in s.get("rows", {}).items():
                rows[table] = rows.get(table, 0) + n
        out["rows"] = rows
        return out
