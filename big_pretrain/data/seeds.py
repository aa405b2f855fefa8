"""The input's random streams: a seed for each use, derived from the config's and the run's.

Each use draws from its own stream, so that changing one (say, the augmentation)
never changes another (the shuffle order).
"""

from __future__ import annotations

import numpy as np

SHUFFLE_STREAM = 0
AUGMENT_STREAM = 1
EVAL_SHUFFLE_STREAM = 2
SECOND_SOURCE_SHUFFLE_STREAM = 3  # a second source mixed into the batches (source.py)


def derive_seed(*seeds: int) -> int:
  """Mixes seeds into one 32-bit seed (the range Grain accepts)."""
  return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])
