"""Counts in messages: "1 shard", "3 shards" (never "1 shards")."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`n` and the noun that agrees with it, thousands separated: plural(1, "shard") -> "1 shard"."""
    count = f"{n:,}" if isinstance(n, int) else str(n)  # None where a count is unknown
    return f"{count} {noun if n == 1 else nouns or noun + 's'}"
