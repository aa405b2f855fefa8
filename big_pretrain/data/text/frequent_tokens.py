"""How both kinds of vocabulary choose their entries from counted texts."""

from __future__ import annotations

import heapq
from typing import Callable, Iterable


def most_frequent(counts: Iterable[tuple[str, int]], min_count: int, max_size: int,
                  keep: Callable[[str], bool] | None = None) -> list[tuple[str, int]]:
  """The (token, count) pairs of `counts` (each token once, with its total count) counted at
  least `min_count` times, among the tokens `keep` accepts, at most `max_size` of them, most
  frequent first; ties are broken alphabetically, so the result is deterministic.

  Applied to its results over parts of `counts`, concatenated, it gives its result over all
  of them: a Beam combiner applies it per worker and again to merge, holding at most
  `max_size` pairs per part.
  """
  if min_count < 1:
    raise ValueError(f'min_count must be at least 1, got {min_count}.')
  if max_size < 1:
    raise ValueError(f'max_size must be at least 1, got {max_size}.')
  candidates = (pair for pair in counts
                if pair[1] >= min_count and (keep is None or keep(pair[0])))
  # nsmallest(n, ...) is sorted(...)[:n], holding n items; no two tokens have the same key.
  return heapq.nsmallest(max_size, candidates, key=_rank)


def _rank(pair: tuple[str, int]) -> tuple[int, str]:
  token, count = pair
  return -count, token
