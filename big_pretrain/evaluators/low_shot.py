"""Low-shot linear probes on frozen, pooled features (as in MAWS, Singh et al., 2023).

For each k in `shots` and each of `seeds` draws, a linear probe (the linear
probe's standardise -> L2 softmax regression -> top-1, see linear_probe.py) is
fitted on exactly k training images of every class and scored on the
`test_examples` held-out images. Reports, per k, the mean, the population
standard deviation (ddof=0: 0 with seeds=1), the minimum and the maximum of the
held-out accuracies over the draws: `{k}shot/accuracy_mean`, `{k}shot/accuracy_std`,
`{k}shot/accuracy_min`, `{k}shot/accuracy_max`.

The pool is the first `train_examples` training images (the usual fixed eval
order), whose features are extracted once per run; the draws only pick rows of
them on the host. Draw d picks, for every class, the first k of a random
permutation of that class's pool examples, from a generator seeded with d alone:
  - the same subsets in every run, on every process, whatever config.seed is,
    so runs and checkpoints are compared on the same examples (as the eval
    order itself is);
  - each k-subset is uniform among the class's examples, without repeats;
  - within a draw the subsets are nested (the 1-shot images are among the
    5-shot ones), so the curve over k of one draw is not noise from new picks.
Each subset is standardised with its own statistics, as the linear probe's train
set is. Every class of the dataset needs at least max(shots) examples in the
pool; otherwise the run stops before fitting anything, naming the short classes
and suggesting a `train_examples` (see `suggested_pool_size`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from big_pretrain import schema
from big_pretrain.errors import ConfigError
from big_pretrain.evaluators.evaluator import EvalResult
from big_pretrain.evaluators.features import FrozenFeatureEvaluator, feature_eval_keys
from big_pretrain.evaluators.linear_probe import (PROBE_KEYS, classify, fit_linear_classifier,
                                                  standardize)

DEFAULT_SHOTS = (1, 5, 10, 25)
_SHOTS = schema.Rule(
    lambda v: (isinstance(v, (tuple, list)) and len(v) > 0
               and all(_is_whole_number(k) and k >= 1 for k in v)),
    f'give a tuple of positive whole numbers of training images per class, e.g. {DEFAULT_SHOTS}')
# Short classes named in the error when a pool lacks examples; the rest are counted.
MAX_CLASSES_NAMED = 5


def _is_whole_number(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def select_k_per_class(labels, k: int, seed: int, num_classes: int | None = None) -> np.ndarray:
  """Indices of exactly `k` examples of each class, drawn without replacement.

  Args:
    labels: (N,) class ids in [0, num_classes).
    k: examples per class.
    seed: the draw; the same seed gives the same indices. For a given seed, the
      indices for a smaller k are a subset of those for a larger one.
    num_classes: classes 0..num_classes-1 each need k examples; by default
      max(labels) + 1.

  Returns:
    (num_classes * k,) int indices into `labels`, sorted.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not len(labels):
    raise ValueError(f'labels must be a non-empty (N,) array; got shape {labels.shape}.')
  if not _is_whole_number(k) or k < 1:
    raise ValueError(f'k={k!r} must be a positive whole number.')
  if labels.min() < 0:
    raise ValueError(f'labels must be class ids >= 0; got {labels.min()}.')
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}); got up to {labels.max()}.')
  rng = np.random.default_rng(seed)
  by_class = np.argsort(labels, kind='stable')  # Each class's indices, contiguous, ascending.
  counts = np.bincount(labels, minlength=num_classes)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  chosen = []
  for label, (start, count) in enumerate(zip(starts, counts)):
    if count < k:
      raise ValueError(f'class {label} has {count} examples, fewer than k={k}.')
    # A whole permutation, whatever k: so the generator's state, and the draw, does not
    # depend on k, and smaller k take a prefix of the same order.
    chosen.append(rng.permutation(by_class[start:start + count])[:k])
  return np.sort(np.concatenate(chosen))


def suggested_pool_size(k: int, num_classes: int) -> int:
  """A pool size that holds k examples of every class, if classes are balanced.

  A random pool with m examples per class on average holds about m +- sqrt(m) of
  each: m = (2 + sqrt(4 + k))^2 solves m - 4 sqrt(m) = k, a 4-sigma margin, so even
  1000 classes all reach k (k=1: 18 per class, k=5: 25, k=25: 55).
  """
  return int(np.ceil((2 + np.sqrt(4 + k)) ** 2 * num_classes))


def check_pool_has_shots(labels, k: int, class_names: Sequence[str], culprit: str) -> None:
  """Raises ValueError naming the classes with fewer than `k` examples in `labels`."""
  counts = np.bincount(np.asarray(labels), minlength=len(class_names))
  short = np.flatnonzero(counts < k)
  if not len(short):
    return
  named = ', '.join(f'{class_names[label]!r} has {counts[label]}'
                    for label in short[:MAX_CLASSES_NAMED])
  more = f', and {len(short) - MAX_CLASSES_NAMED} more' if len(short) > MAX_CLASSES_NAMED else ''
  raise ValueError(
      f'{culprit}: {k}-shot probes need {k} training images of every class, but in the '
      f'{len(labels)} read (train_examples) {len(short)} of the {len(class_names)} classes '
      f'have fewer: {named}{more}. Raise {culprit}.train_examples (to about '
      f'{suggested_pool_size(k, len(class_names))} if the classes are balanced), or drop {k} '
      f'from {culprit}.shots.')


def low_shot_accuracies(train_features, train_labels, test_features, test_labels, *,
                        num_classes: int, shots: Sequence[int], seeds: int, l2: float,
                        num_steps: int) -> dict[int, list[float]]:
  """{k: [held-out accuracy of the probe fitted on draw seed, for seed in range(seeds)]}.

  Draw `seed` of k is `select_k_per_class(train_labels, k, seed, num_classes)`.
  """
  train_features, train_labels = np.asarray(train_features), np.asarray(train_labels)
  accuracies = {}
  for k in shots:
    accuracies[k] = []
    for seed in range(seeds):
      chosen = select_k_per_class(train_labels, k, seed, num_classes)
      train, test = standardize(train_features[chosen], test_features)
      weights, bias = fit_linear_classifier(train, train_labels[chosen], num_classes, l2,
                                            num_steps)
      accuracies[k].append(float(np.mean(classify(test, weights, bias) == test_labels)))
  return accuracies


def summarize_accuracies(accuracies: dict[int, Sequence[float]]) -> dict[str, float]:
  """'{k}shot/accuracy_{mean,std,min,max}' over each k's draws; std is the population std."""
  scalars = {}
  for k, values in accuracies.items():
    values = np.asarray(values, np.float64)
    scalars.update({f'{k}shot/accuracy_mean': float(values.mean()),
                    f'{k}shot/accuracy_std': float(values.std()),
                    f'{k}shot/accuracy_min': float(values.min()),
                    f'{k}shot/accuracy_max': float(values.max())})
  return scalars


class LowShotEvaluator(FrozenFeatureEvaluator):

  config_keys = feature_eval_keys(
      'low_shot', 'linear probes on k images per class, several draws',
      shots=schema.Key(DEFAULT_SHOTS, _SHOTS, 'the training images per class of each probe'),
      seeds=schema.Key(3, schema.Rule(lambda v: _is_whole_number(v) and v >= 1,
                                      'give the number of draws per k, a whole number >= 1 '
                                      '(3 is usual)'),
                       'draws of the training images per k (mean, std over them)'),
      **PROBE_KEYS)

  @classmethod
  def check_config(cls, eval_config, path):
    shots = eval_config.shots
    if _SHOTS.refuses(shots):
      return  # its rule names it
    if len(set(shots)) != len(shots):
      raise ConfigError(f'{path}.shots={tuple(shots)} repeats a value: list each k once.')
    if max(shots) > eval_config.train_examples:
      raise ConfigError(
          f'{path}.shots={tuple(shots)}: {max(shots)} images per class cannot come from '
          f'train_examples={eval_config.train_examples} images. Raise {path}.train_examples '
          '(to well above max(shots) x the number of classes) or lower shots.')

  def run(self, params, step):
    data = self.features(params)
    shots = tuple(self.eval_config.shots)
    # Every k at once, before any fit: a short pool fails in seconds, not after k=1..
    check_pool_has_shots(data.train_labels, max(shots), data.class_names, self.culprit())
    accuracies = low_shot_accuracies(
        data.train_features, data.train_labels, data.test_features, data.test_labels,
        num_classes=data.num_classes, shots=shots, seeds=self.eval_config.seeds,
        l2=self.eval_config.l2, num_steps=self.eval_config.num_steps)
    return EvalResult(scalars={**summarize_accuracies(accuracies), 'chance': data.chance})
