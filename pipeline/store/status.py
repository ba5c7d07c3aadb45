"""`attnpipe status OUT`: where a dataset stands, read from its plan, commit records, failure
records and lock only (no data file is opened, torch is never imported).

Shards are committed (a record in `_commits/`), failed (a record in `_failures/` written after the
shard used up its retries, and no commit since) or pending (planned in `_dataset.json` but
neither). The plan is the one of the last run: rows appended to the corpus since then are not
counted until the next run plans them.

Exit codes of the command: 0 complete (every planned shard committed, none failed), 3 not
complete (pending or failed shards, or nothing planned yet), 1 an error (not an attnpipe
output, storage format 1, an unreadable record).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from ..words import plural
from . import paths
from .commit import read_records
from .dataset import check_format, read_info, version_location, versions
from .location import Location, as_location
from .lock import stale_reason

EXIT_COMPLETE, EXIT_INCOMPLETE = 0, 3
DEFAULT_LEASE = 900.0
APPENDED_NOTE = "rows appended to the corpus since the last run are not counted until the next run"


def _failures(out: Location | Path | str) -> dict[int, dict]:
    """shard -> its failure record; an unreadable one still says that the shard failed."""
    loc = as_location(out)
    found: dict[int, dict] = {}
    for name in loc.listdir(paths.FAILURES):
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        path = PurePosixPath(name)
        try:
            record = json.loads(loc.read_text(f"{paths.FAILURES}/{name}"))
            shard = int(record["shard"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            try:
                shard = int(path.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            record = {"shard": shard, "error": f"(failure record {path.name} cannot be read: {exc})"}
        error = str(record.get("error") or "(no error recorded)").strip().splitlines()
        found[shard] = {"shard": shard, "error": error[0] if error else "(no error recorded)",
                        **{k: record.get(k) for k in ("corpus_rows", "attempts", "failed_at", "executor")}}
    return found


def lock_state(out: Location | Path | str, lease: float) -> dict | None:
    """The holder of `_lock` and whether it looks alive; None when no run holds it."""
    loc = as_location(out)
    try:
        text = loc.read_text(paths.LOCK)
        age = loc.age(paths.LOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"host": None, "pid": None, "started": None, "age_s": None, "running": None,
                "stale": f"the lock cannot be read ({exc.strerror or exc})"}
    try:
        holder = json.loads(text)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:
        holder = {}  # a torn write: judge by age alone
    state = {"host": holder.get("host"), "pid": holder.get("pid"), "started": holder.get("started"),
             "run_id": holder.get("run_id"), "age_s": round(age, 1), "lease_s": lease}
    stale = stale_reason(holder, age, lease)
    state["stale"], state["running"] = stale, stale is None
    return state


def _seconds_between(a: str | None, b: str | None) -> float | None:
    try:
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        return (datetime.strptime(b, fmt) - datetime.strptime(a, fmt)).total_seconds()
    except (TypeError, ValueError):
        return None


def _one(out: Location) -> dict:
    """The status of one version folder (no later versions)."""
    info, records = read_info(out), read_records(out)
    failures = _failures(out)
    lease = float(((info or {}).get("job") or {}).get("run", {}).get("lock_lease") or DEFAULT_LEASE)
    lock = lock_state(out, lease)
    plan = (info or {}).get("plan")
    if plan:
        planned = len(plan["shards"])
    elif info:  # written before shard plans existed: the job's shard count
        planned = ((info.get("job") or {}).get("run") or {}).get("num_shards")
    else:
        planned = None
    committed = sorted(records)
    failed = [failures[s] for s in sorted(failures) if s not in records]
    pending = [s for s in range(planned or 0) if s not in records and s not in failures]
    rows: dict[str, int] = {}
    for r in records.values():
        for table, n in (r.get("rows") or {}).items():
            rows[table] = rows.get(table, 0) + n
    totals = {k: sum(r.get(k) or 0 for r in records.values())
              for k in ("documents", "empty_documents", "windows", "tokens")}
    seconds = sum(r.get("seconds") or 0.0 for r in records.values())
    stamps = sorted(r["committed_at"] for r in records.values() if r.get("committed_at"))
    complete = planned is not None and not failed and not pending and len(committed) >= planned
    if complete:
        state = "complete"
    elif lock and lock["running"]:
        state = "running"
    elif failed:
        state = "failed"
    else:
        state = "incomplete"
    return {
        "output": str(out), "job": ((info or {}).get("job") or {}).get("name"),
        "job_fingerprint": (info or {}).get("job_fingerprint"),
        "state": state, "complete": complete, "exit_code": EXIT_COMPLETE if complete else EXIT_INCOMPLETE,
        "shards": {"planned": planned, "committed": committed, "failed": failed, "pending": pending},
        "lock": lock,
        "rows": dict(sorted(rows.items())), **totals,
        "last_run": {"first_commit": stamps[0] if stamps else None, "last_commit": stamps[-1] if stamps else None,
                     "span_s": _seconds_between(stamps[0], stamps[-1]) if stamps else None},
        "throughput": {"shard_seconds": round(seconds, 3),
                       "tokens_per_s": round(totals["tokens"] / seconds, 1) if seconds else None,
                       "documents_per_s": round(totals["documents"] / seconds, 2) if seconds else None},
        "corpus_rows": plan.get("corpus_rows") if plan else None,
        "corpus_note": APPENDED_NOTE,
    }


def status(out: Path) -> dict:
    """The status of OUT (version 1, the folder itself) and a short one of each later version.
    Raises OutputError for a folder that is not an attnpipe output (format 2)."""
    out = as_location(out)
    if not out.isdir():
        raise OutputError(f"{out} is not a folder" if out.exists() else f"{out} does not exist")
    check_format(out)
    present = versions(out)
    later = [v for v in present if v > 1]
    has_own = 1 in present or out.exists(paths.LOCK)
    if not has_own:
        hint = (f"; its later versions are {', '.join(str(version_location(out, v)) for v in later)}: "
                "ask for one of those" if later else "")
        raise OutputError(f"{out} is not an attnpipe output (no {paths.DATASET}, commit records or lock){hint}")
    s = _one(out)
    s["versions"] = []
    for v in later:
        folder = version_location(out, v)
        try:
            check_format(folder)
            sub = _one(folder)
            s["versions"].append({"output": str(folder), "state": sub["state"],
                                  "committed": len(sub["shards"]["committed"]), "planned": sub["shards"]["planned"],
                                  "failed": len(sub["shards"]["failed"]),
                                  "last_commit": sub["last_run"]["last_commit"]})
        except OutputError as exc:
            s["versions"].append({"output": str(folder), "state": "error", "error": str(exc)})
    return s


def _shard_list(shards: list[int], limit: int = 20) -> str:
    """0..3, 7, 9..12 (runs compressed), the first `limit` items."""
    parts, i = [], 0
    while i < len(shards):
        j = i
        while j + 1 < len(shards) and shards[j + 1] == shards[j] + 1:
            j += 1
        parts.append(str(shards[i]) if j == i else f"{shards[i]}..{shards[j]}" if j > i + 1
                     else f"{shards[i]}, {shards[j]}")
        i = j + 1
    shown = ", ".join(parts[:limit])
    return shown + (f", ... ({len(parts) - limit} more runs)" if len(parts) > limit else "")


def format_status(s: dict) -> str:
    sh = s["shards"]
    planned = sh["planned"]
    head = {"complete": "complete", "running": "a run is writing to it", "failed": "not complete (failed shards)",
            "incomplete": "not complete"}[s["state"]]
    count = (f"{len(sh['committed'])} of {plural(planned, 'shard')} committed" if planned is not None
             else f"{plural(len(sh['committed']), 'shard')} committed, nothing planned yet")
    lines = [f"{s['output']}: job {s['job']!r}, {head}: {count}, {len(sh['failed'])} failed, "
             f"{len(sh['pending'])} pending"]
    lines.append(f"  committed  {_shard_list(sh['committed']) or '-'}")
    for f in sh["failed"][:10]:
        extra = ", ".join(x for x in (f"{f['attempts']} attempts" if f.get("attempts") else "",
                                      f"at {f['failed_at']}" if f.get("failed_at") else "") if x)
        lines.append(f"  failed     {f['shard']}: {f['error']}" + (f" ({extra})" if extra else ""))
    if len(sh["failed"]) > 10:
        lines.append(f"  failed     ... and {len(sh['failed']) - 10} more")
    lines.append(f"  pending    {_shard_list(sh['pending']) or '-'}")
    lock = s["lock"]
    if lock is None:
        lines.append("lock:       none (no run is writing)")
    else:
        who = f"host {lock['host']}, pid {lock['pid']}, started {lock['started']}"
        if lock["running"]:
            lines.append(f"lock:       held by a running run ({who}; renewed {lock['age_s']:.0f} s ago)")
        else:
            lines.append(f"lock:       stale, left by a dead run ({who}): {lock['stale']}; the next run takes it over")
    if s["rows"]:
        lines.append("rows:")
        lines += [f"  {table:<11} {n:>12,}" for table, n in s["rows"].items()]
    lines.append(f"documents:  {s['documents']:,} ({s['empty_documents']:,} empty), {s['windows']:,} windows, "
                 f"{s['tokens']:,} tokens")
    run = s["last_run"]
    if run["last_commit"]:
        lines.append(f"last run:   last commit {run['last_commit']}")
    t = s["throughput"]
    if t["tokens_per_s"] is not None:
        lines.append(f"throughput: {t['tokens_per_s']:,.0f} tokens/s, {t['documents_per_s']:,.1f} documents/s "
                     f"({t['shard_seconds']:,.1f} s of shard time, summed over shards)")
    if s["corpus_rows"] is not None:
        lines.append(f"corpus:     {s['corpus_rows']:,} rows planned ({s['corpus_note']})")
    for v in s["versions"]:
        if v["state"] == "error":
            lines.append(f"later version {v['output']}: {v['error']}")
        else:
            lines.append(f"later version {v['output']}: {v['state']}, {v['committed']} of "
                         f"{plural(v['planned'], 'shard')} committed, {v['failed']} failed"
                         + (f", last commit {v['last_commit']}" if v["last_commit"] else ""))
    return "\n".join(lines)
