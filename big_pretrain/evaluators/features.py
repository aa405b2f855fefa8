"""Frozen features for the probing evaluators (linear probe, k-NN).

Both evaluators need the same thing: the pooled output of the frozen, unmasked
encoder on the first `train_examples` images of a training split and the
first `test_examples` images of a held-out split, with their labels, as host
numpy arrays. `FrozenFeatureEvaluator` supplies that; its subclasses only fit
and score.

Each split reads `config.data` with the evaluator's `train_data` / `test_data`
overrides on top (by default only `split`): the first N examples of a fixed
shuffled order (`pipeline.eval_order`), centre crops, no augmentation, each
image exactly once (`pipeline.ordered_batches` pads the last batch with
masked rows, on every process alike).
"""

from __future__ import annotations

import dataclasses
import math

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import sources
from big_pretrain.data.pipeline import eval_order, ordered_batches
from big_pretrain.evaluators.evaluator import Evaluator

SPLIT_KEYS = ('train', 'test')


def feature_eval_defaults(kind: str) -> ml_collections.ConfigDict:
  """The config keys every frozen-feature evaluator shares."""
  return ml_collections.ConfigDict(dict(
      kind=kind,
      every_steps=0,
      train_examples=2048,  # First images of the train split the probe is fitted on.
      test_examples=1024,   # First images of the held-out split it is scored on.
      batch_size=256,       # Global; rounded up to a multiple of the batch shards.
      # Also score the stage's starting parameters, before its first step (only when it
      # starts fresh): the baseline its final score is read against (an untrained
      # encoder, or the one an earlier stage handed over).
      at_start=False,
      # Overrides of config.data keys for each split (e.g. test_data.test_path).
      train_data=ml_collections.ConfigDict(dict(split='train')),
      test_data=ml_collections.ConfigDict(dict(split='test')),
  ))


def split_data_config(data_config, overrides, *, num_examples: int | None = None,
                      culprit: str = 'train_data') -> ml_collections.ConfigDict:
  """A copy of `data_config` with `overrides` applied; `num_examples` sets the synthetic size.

  `culprit` names the overrides group in errors ('config.evals.knn.train_data').
  """
  data = data_config.copy_and_resolve_references()
  for key, value in (overrides or {}).items():
    if key not in data:
      raise ValueError(
          f'{culprit}.{key}: not a config.data key. Per-split overrides may set any of '
          f'{", ".join(sorted(data.keys()))}.')
    try:
      data[key] = value
    except TypeError as error:  # ConfigDict's type safety; its message names no config path.
      raise ValueError(f'{culprit}.{key}={value!r}: {error}') from error
  if data.split not in sources.SPLITS:
    raise ValueError(f'{culprit}.split={data.split!r}: choose one of {sources.SPLITS}.')
  if num_examples is not None and data.source == 'synthetic':
    data.num_examples = int(num_examples)
  return data


def round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple


def extract_features(encode, params, data_config, *, num_examples: int, batch_size: int,
                     mesh, rules, culprit: str = 'features'):
  """Pooled features of the first `num_examples` examples of `data_config`'s split.

  Args:
    encode: jitted `(params, uint8 images) -> (B, D) features`, batch-sharded.
    params: the (sharded) parameters `encode` takes.
    data_config: the split's full data config (see `split_data_config`).
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
      lambda params, batch: encode(params, batch['image']), params, data_config,
      num_examples=num_examples, batch_size=batch_size, mesh=mesh, rules=rules,
      culprit=culprit)
  seen = len(np.unique(labels))
  if seen < len(class_names):
    logging.warning(
        '%s: the %d %r examples read cover only %d of %d classes, so the accuracy only '
        'measures those. Eval pipelines read in order, and image folders are sorted by '
        'class: raise the number of examples to cover every class.',
        culprit, len(labels), data_config.split, seen, len(class_names))
  return features.astype(np.float32), labels, class_names


def extract_outputs(apply_fn, params, data_config, *, num_examples: int, batch_size: int,
                    mesh, rules, culprit: str = 'features'):
  """`apply_fn`'s outputs on the first `num_examples` examples of `data_config`'s split.

  As `extract_features`, for any function of the whole batch (e.g. image and
  text embeddings of the same examples).

  Args:
    apply_fn: `(params, batch) -> pytree of (B, ...) arrays`, batch-sharded; `batch`
      is the pipeline's dict of global arrays ('image', 'label', ...). Usually jitted.
    params, data_config, num_examples, batch_size, mesh, rules, culprit: as in
      `extract_features`.

  Returns:
    (outputs: the pytree of (N, ...) numpy arrays, labels (N,) int32, class_names),
    identical on every process.
  """
  if num_examples <= 0:
    raise ValueError(f'{culprit}: num_examples must be positive, got {num_examples}.')
  data_config = data_config.copy_and_resolve_references()
  if data_config.source == 'synthetic':
    data_config.num_examples = int(num_examples)  # generated: exactly the examples asked for
  source = sources.build_source(data_config)
  available = len(source)
  if available < num_examples:
    logging.info('%s: the %r split has %d examples (%d asked for): scoring each once.',
                 culprit, data_config.split, available, num_examples)
  indices = eval_order(data_config, available)[:num_examples]
  shards = sharding_lib.num_batch_shards(mesh) * jax.process_count()
  # The last batch is padded with masked rows: every image counts exactly once.
  global_batch = round_up(min(batch_size, len(indices)), shards)

  outputs, labels, unreadable = [], [], 0
  for batch, rows in ordered_batches(source, indices, data_config,
                                     global_batch_size=global_batch, mesh=mesh):
    with sharding_lib.activate(mesh, rules):
      batch_outputs = apply_fn(params, batch)
    # Gathered on every process: each scores (or fits a probe on) the same data.
    batch_outputs = multihost_utils.process_allgather(batch_outputs, tiled=True)
    keep = rows['valid']
    unreadable += int(np.sum(~keep & (rows['index'] >= 0)))
    outputs.append(jax.tree.map(lambda value, keep=keep: np.asarray(value)[keep],
                                batch_outputs))
    labels.append(rows['label'][keep])
  if unreadable:
    logging.warning('%s: %d unreadable images of the %r split were left out.', culprit,
                    unreadable, data_config.split)
  outputs = jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
  return outputs, np.concatenate(labels).astype(np.int32), source.class_names


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
  """An evaluator that scores the frozen encoder's pooled features; see module doc."""

  def __init__(self, *args):
    super().__init__(*args)
    for key in ('train_examples', 'test_examples', 'batch_size'):
      if self.eval_config[key] <= 0:
        raise ValueError(f'{self._culprit(key)}={self.eval_config[key]} must be positive.')
    self._encode = None  # Jitted on first use; reused by every run of this evaluator.

  def _culprit(self, key: str) -> str:
    return f'config.evals.{self.name}.{key}'

  def _encode_fn(self):
    if self._encode is None:
      objective = self.objective

      def encode(params, images):
        return objective.encode(params, images)['pooled'].astype(jnp.float32)

      self._encode = jax.jit(
          encode, out_shardings=sharding_lib.batch_sharding(self.trainer.mesh))
    return self._encode

  def split_features(self, params, split_key: str):
    """(features, labels, class_names) of the 'train' or 'test' split for `params`."""
    if split_key not in SPLIT_KEYS:
      raise ValueError(f'split_key={split_key!r}: choose one of {SPLIT_KEYS}.')
    data_key, count_key = f'{split_key}_data', f'{split_key}_examples'
    num_examples = self.eval_config[count_key]
    data_config = split_data_config(
        self.stage_config.data, self.eval_config[data_key], num_examples=num_examples,
        culprit=self._culprit(data_key))
    return extract_features(
        self._encode_fn(), params, data_config, num_examples=num_examples,
        batch_size=self.eval_config.batch_size, mesh=self.trainer.mesh,
        rules=self.trainer.rules, culprit=self._culprit(data_key))

  def features(self, params) -> SplitFeatures:
    train_features, train_labels, train_classes = self.split_features(params, 'train')
    test_features, test_labels, test_classes = self.split_features(params, 'test')
    if train_classes != test_classes:
      # Labels are positions in the sorted class list: they only agree if the lists do.
      only_train = sorted(set(train_classes) - set(test_classes))[:5]
      only_test = sorted(set(test_classes) - set(train_classes))[:5]
      raise ValueError(
          f'config.evals.{self.name}: the train split has {len(train_classes)} classes, the '
          f'test split {len(test_classes)} (only in train: {only_train}, only in test: '
          f'{only_test}). Point train_data and test_data (or config.data.path and '
          'config.data.test_path) at folders with the same class subfolders.')
    return SplitFeatures(train_features, train_labels, test_features, test_labels,
                         train_classes)
