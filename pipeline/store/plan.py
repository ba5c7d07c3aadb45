"""The shard plan: which corpus rows each shard covers, fixed once a shard is committed.

The first run splits the corpus rows into `num_shards` contiguous ranges. The plan is kept in
`_dataset.json`; when the corpus has grown by appending, the new rows become new shards of the
same size at the end, and committed shards keep their rows (their records and files untouched).
A corpus with fewer rows than committed shards cover was not appended to, and is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OutputError


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: corpus rows [start, stop)."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def contiguous(rows: int, num_shards: int) -> list[list[int]]:
    """[start, stop) of each of `num_shards` shards, sizes differing by at most one (the split
    of datasets' `Dataset.shard(contiguous=True)`). Never more shards than rows: shards past the
    last row would be empty, and a huge num_shards must not build a huge plan."""
    div, mod = divmod(rows, num_shards)
    bounds, start = [], 0
    for i in range(min(num_shards, rows)):
        stop = start + div + (1 if i < mod else 0)
        bounds.append([start, stop])
        start = stop
    return bounds


def make_plan(rows: int, num_shards: int, stored: dict | None, committed: dict[int, dict],
              limit: int | None = None) -> dict:
    """The plan for a corpus of `rows` rows: the stored plan, extended for appended rows (or a
    larger `corpus.limit`); a new one when nothing is committed yet."""
    if committed and not stored:  # _dataset.json was lost: the committed shards' rows are the plan
        stored = plan_from_records(committed, num_shards)
    if not stored or not committed:
        return {"num_shards": num_shards, "rows_per_shard": max(1, math.ceil(rows / num_shards)),
                "corpus_rows": rows, "shards": contiguous(rows, num_shards)}
    shards = [list(s) for s in stored["shards"]]
    covered = shards[-1][1] if shards else 0
    needed = max((stored["shards"][s][1] for s in committed if s < len(stored["shards"])), default=0)
    if rows < needed and limit is not None and limit < needed:
        raise OutputError(f"corpus.limit is {limit}, but committed shards already cover the first {needed} corpus "
                          f"rows; give --limit {needed} or more (or none) to continue that data, or --new-run to "
                          "start a new version with this limit")
    if rows < needed:
        raise OutputError(f"the corpus has {rows} rows, fewer than the {needed} that committed shards cover: rows "
                          "were removed or the corpus replaced, not appended to; rerun with --new-run to write a "
                          "new version beside the old data, or choose another --output")
    if rows < covered:  # planned but uncommitted shards past the end: plan them again
        shards = [s for i, s in enumerate(shards) if s[1] <= rows or i in committed]
        covered = shards[-1][1] if shards else 0
    step = stored["rows_per_shard"]
    while covered < rows:
        shards.append([covered, min(covered + step, rows)])
        covered = shards[-1][1]
    return {**stored, "corpus_rows": rows, "shards": shards}


def plan_from_records(committed: dict[int, dict], num_shards: int) -> dict:
    """The plan as far as the commit records tell it: each committed shard's rows; a shard
    missing between two committed ones covers the rows between them."""
    shards, covered = [], 0
    for index in range(max(committed) + 1):
        if index in committed:
            start, stop = committed[index]["corpus_rows"]
        else:
            later = [committed[s]["corpus_rows"][0] for s in committed if s > index]
            start, stop = covered, min(later)
        shards.append([start, stop])
        covered = stop
    size = max(stop - start for start, stop in shards)
    return {"num_shards": num_shards, "rows_per_shard": max(size, 1), "corpus_rows": covered, "shards": shards}


def shard_specs(plan: dict) -> list[ShardSpec]:
    return [ShardSpec(i, start, stop) for i, (start, stop) in enumerate(plan["shards"])]
