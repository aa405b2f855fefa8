"""How both kinds of vocabulary choose their entries from counted texts."""

from __future__ import annotations

from typing import Mapping


def most_frequent(counts: Mapping[str, int], min_count: int, max_size: int) -> list[str]:
  """The keys of `counts` counted at least `min_count` times, at most `max_size` of them, most
  frequent first; ties are broken alphabetically, so the result is deterministic."""
  if min_count < 1:
    raise ValueError(f'min_count must be at least 1, got {min_count}.')
  if max_size < 1:
    raise ValueError(f'max_size must be at least 1, got {max_size}.')
  frequent = sorted((key for key, count in counts.items() if count >= min_count),
                    key=lambda key: (-counts[key], key))
  return frequent[:max_size]
