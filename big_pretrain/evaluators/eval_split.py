"""How every evaluator reads data: the first N examples of one split, each exactly once.

A split is `config.data` with the evaluator's per-split overrides on top
(`test_data`, `train_data`: by default only `split`). It is read in a fixed
shuffled order (`eval_input.eval_order`, the same in every run whatever the
seed), as centre crops with no augmentation, in batch-sharded global batches
(`eval_input.ordered_batches`). The last batch is padded with rows whose
'valid' is False, and an unreadable image is such a row too: every process
reads the same number of whole batches, and every readable image counts once.

`extract_outputs` runs a function over those batches and returns its outputs
on the valid rows, gathered on every process; `open_split` is the one place a
split's source, order and batch size are chosen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import sources
from big_pretrain.data.eval_input import eval_order, ordered_batches


def round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple


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


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """The examples an evaluator reads of one split, and how they are batched."""
  source: Any             # built by data.sources.build_source
  data_config: ml_collections.ConfigDict
  indices: np.ndarray      # into `source`, in reading order
  global_batch_size: int   # a multiple of the batch shards of all processes
  mesh: jax.sharding.Mesh

  @property
  def class_names(self) -> list[str]:
    return self.source.class_names

  def batches(self):
    """Yields (batch: batch-sharded global arrays; rows: host numpy fields of every row,
    'valid' among them, identical on every process), each example in exactly one row."""
    return ordered_batches(self.source, self.indices, self.data_config,
                           global_batch_size=self.global_batch_size, mesh=self.mesh)


def open_split(data_config, *, num_examples: int, batch_size: int, mesh,
               culprit: str) -> EvalSplit:
  """The first `num_examples` examples of `data_config`'s split (all of them if it has fewer).

  Args:
    data_config: the split's full data config (see `split_data_config`).
    num_examples: how many examples to read at most; positive.
    batch_size: requested global batch; capped at the examples read, then rounded up to
      a multiple of the batch shards of all processes.
    mesh: the mesh the batches are sharded over.
    culprit: names the config group in errors and logs.
  """
  if num_examples <= 0:
    raise ValueError(f'{culprit}: num_examples must be positive, got {num_examples}.')
  data_config = data_config.copy_and_resolve_references()
  if data_config.source == 'synthetic':
    data_config.num_examples = int(num_examples)  # generated: exactly the examples asked for
  source = sources.build_source(data_config)
  available = len(source)
  if available < num_examples:
    logging.info('%s: the %r split has %d examples (%d asked for): using each of them once.',
                 culprit, data_config.split, available, num_examples)
  indices = eval_order(data_config, available)[:num_examples]
  shards = sharding_lib.num_batch_shards(mesh) * jax.process_count()
  return EvalSplit(source, data_config, indices,
                   round_up(min(batch_size, len(indices)), shards), mesh)


def extract_outputs(apply_fn, params, data_config, *, num_examples: int, batch_size: int,
                    mesh, rules, culprit: str = 'features'):
  """`apply_fn`'s outputs on the first `num_examples` examples of `data_config`'s split.

  Args:
    apply_fn: `(params, batch) -> pytree of (B, ...) arrays`, batch-sharded; `batch`
      is the pipeline's dict of global arrays ('image', 'label', ...). Usually jitted
      (`Evaluator.jit`); called under `mesh` and `rules`.
    params: the (sharded) parameters `apply_fn` takes.
    data_config, num_examples, batch_size, mesh, culprit: as `open_split` takes them.
    rules: the logical-axis rules `apply_fn` is traced under.

  Returns:
    (outputs: the pytree of (N, ...) numpy arrays, labels (N,) int32, class_names of
    the split's source), identical on every process; N = min(num_examples, the
    split's size), each example once (fewer if some images are unreadable).
  """
  split = open_split(data_config, num_examples=num_examples, batch_size=batch_size, mesh=mesh,
                     culprit=culprit)
  outputs, labels, unreadable = [], [], 0
  for batch, rows in split.batches():
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
                    unreadable, split.data_config.split)
  outputs = jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
  return outputs, np.concatenate(labels).astype(np.int32), split.class_names


def images_only(function):
  """`function(params, images)` as a function of the whole batch, as `extract_outputs` calls it."""
  return lambda params, batch: function(params, batch['image'])


def warn_about_missing_classes(labels: np.ndarray, class_names, split: str,
                               culprit: str) -> None:
  """Logs when the examples read cover only some classes: accuracy then measures those."""
  seen = len(np.unique(labels))
  if seen < len(class_names):
    logging.warning(
        '%s: the %d %r examples read cover only %d of %d classes, so the accuracy only '
        'measures those. Eval pipelines read in order, and image folders are sorted by '
        'class: raise the number of examples to cover every class.',
        culprit, len(labels), split, seen, len(class_names))
