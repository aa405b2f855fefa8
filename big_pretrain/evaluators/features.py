"""Frozen features for the probing evaluators (linear probe, k-NN, low-shot, attentive probe).

They all need the same thing: the frozen, unmasked encoder's features of the
first `train_examples` images of a training split and the first
`test_examples` images of a held-out split, with their labels, as host numpy
arrays. `FrozenFeatureEvaluator` supplies that; its subclasses only fit and
score. Each split is read as every evaluator reads one (eval_split.py): the
first N examples of a fixed shuffled order, centre crops, each image once.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from big_pretrain import schema
from big_pretrain.evaluators.eval_split import (extract_outputs, images_only,
                                                warn_about_missing_classes)
from big_pretrain.evaluators.evaluator import Evaluator, held_out_keys, split_overrides

SPLIT_KEYS = ('train', 'test')


def feature_eval_keys(kind: str, meaning: str, **declared) -> schema.Group:
  """The config keys every frozen-feature evaluator shares, and `declared`."""
  return held_out_keys(
      kind, meaning, test_examples=1024,
      train_examples=schema.Key(2048, schema.COUNT,
                                'the first images of the train split the probe is fitted on'),
      at_start=schema.Key(False, schema.BOOLEAN,
                          "also score the stage's starting parameters, before its first step "
                          '(when it starts fresh): the baseline its final score is read '
                          'against'),
      train_data=split_overrides('train', 'train'),
      **declared)


def extract_features(encode, params, data_config, *, num_examples: int, batch_size: int,
                     mesh, rules, culprit: str = 'features'):
  """Pooled features of the first `num_examples` examples of `data_config`'s split.

  Args:
    encode: jitted `(params, uint8 images) -> (B, D) features`, batch-sharded.
    params: the (sharded) parameters `encode` takes.
    data_config: the split's full data config (see `eval_split.split_data_config`).
    num_examples: how many examples to read at most.
    batch_size: requested global batch; rounded to the batch shards of all processes.
    mesh, rules: where `encode` runs.
    culprit: names the config group in errors and warnings.

  Returns:
    (features (N, D) float32, labels (N,) int32, class_names of the split's
    source), identical on every process; N = min(num_examples, the split's size),
    each example once (fewer if some images are unreadable).
  """
  features, labels, class_names = extract_outputs(
      images_only(encode), params, data_config, num_examples=num_examples,
      batch_size=batch_size, mesh=mesh, rules=rules, culprit=culprit)
  warn_about_missing_classes(labels, class_names, data_config.split, culprit)
  return features.astype(np.float32), labels, class_names


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
  """Features and labels of the train and the held-out split."""
  train_features: np.ndarray  # (N_train, D) float32
  train_labels: np.ndarray    # (N_train,) int32
  test_features: np.ndarray   # (N_test, D) float32
  test_labels: np.ndarray     # (N_test,) int32
  class_names: list[str]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def chance(self) -> float:
    """1 / the number of classes: a uniform guess's accuracy, as classification and
    zero-shot report it (so every row of a results table means the same)."""
    return 1.0 / max(self.num_classes, 1)


class FrozenFeatureEvaluator(Evaluator):
  """An evaluator that scores the frozen encoder's features; see the module docstring.

  `encode_images(params, uint8 images)` gives the features (by default the pooled
  (B, D) output); a subclass may override it, e.g. with (B, L, D) tokens.
  """

  def encode_images(self, params, images):
    return self.objective.encode(params, images)['pooled'].astype(jnp.float32)

  def device_programs(self):
    return {'encode_images': (self.encode_images, (self.image_batch(),))}

  def split_features(self, params, split_key: str):
    """(features, labels, class_names) of the 'train' or 'test' split for `params`."""
    if split_key not in SPLIT_KEYS:
      raise ValueError(f'split_key={split_key!r}: choose one of {SPLIT_KEYS}.')
    return self.split_outputs(
        images_only(self.jit('encode_images', self.encode_images)), params,
        data_key=f'{split_key}_data', num_examples=self.eval_config[f'{split_key}_examples'],
        check_classes=True)

  def features(self, params) -> SplitFeatures:
    train_features, train_labels, train_classes = self.split_features(params, 'train')
    test_features, test_labels, test_classes = self.split_features(params, 'test')
    if train_classes != test_classes:
      # Labels are positions in the sorted class list: they only agree if the lists do.
      only_train = sorted(set(train_classes) - set(test_classes))[:5]
      only_test = sorted(set(test_classes) - set(train_classes))[:5]
      raise ValueError(
          f'{self.culprit()}: the train split has {len(train_classes)} classes, the '
          f'test split {len(test_classes)} (only in train: {only_train}, only in test: '
          f'{only_test}). Point train_data and test_data (or config.data.path and '
          'config.data.test_path) at folders with the same class subfolders.')
    return SplitFeatures(train_features, train_labels, test_features, test_labels,
                         train_classes)
