"""A fixed part of a source: a labelled subset (config.data.subset), or the unlabelled rest."""

from __future__ import annotations

from typing import Any

import numpy as np

from big_pretrain import schema

# config.data.subset: a fixed part of the training split.
DATA_KEYS = schema.Group(
    "only a fixed random part of the training split (self-training's labelled subset), or "
    'with complement=True all the others (its unlabelled rest)',
    fraction=schema.Key(1.0, schema.within(0, 1, low_open=True),
                        'the fraction of the examples in the part, drawn from data.seed'),
    complement=schema.Key(False, schema.BOOLEAN, 'take every example not in the part'),
)

_SUBSET_STREAM = 7  # Keeps the subset's draw apart from the synthetic images' streams.


class SubsetSource:
  """The examples of `source` in a fixed random `fraction` of its indices, or all but those.

  The part is drawn once from `seed` (a permutation of the indices; the first
  round(fraction * len) are 'in'), so `complement=False` and `complement=True`
  split one dataset into two disjoint parts that cover it: e.g. 10% of
  ImageNet's labels, and the other 90% as unlabelled images for self-training.
  Examples keep their order, their keys and their labels.
  """

  def __init__(self, source, fraction: float, *, complement: bool = False, seed: int = 0):
    order = np.random.default_rng((int(seed), _SUBSET_STREAM)).permutation(len(source))
    count = int(round(fraction * len(source)))
    indices = order[count:] if complement else order[:count]
    if not len(indices):  # pylint: disable=g-explicit-length-test
      raise ValueError(
          f'config.data.subset (fraction={fraction}, complement={complement}) of a source of '
          f'{len(source)} examples is empty.')
    self._source = source
    self._indices = np.sort(indices)

  def __len__(self) -> int:
    return len(self._indices)

  @property
  def class_names(self) -> list[str]:
    return self._source.class_names

  @property
  def num_classes(self) -> int:
    return self._source.num_classes

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[int(index)])]
