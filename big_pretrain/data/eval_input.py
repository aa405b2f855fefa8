"""The evaluation input: every example of a split exactly once, in a fixed order.

Evaluators and the pseudo-label job read `ordered_batches`: global batches of
the examples they ask for, each once, with per-row host values (ROW_FIELDS:
valid, index, label, key) identical on every process. The last batch is padded
and an unreadable image is a row marked invalid rather than skipped, so every
process reads the same number of whole batches. `eval_order` is the fixed order
evaluators read a split in.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import batch_features
from big_pretrain.data import example_maps
from big_pretrain.data import process_share
from big_pretrain.data import seeds
from big_pretrain.data import transforms
from big_pretrain.data.sources.source import example_key

# Keys travel between processes as fixed-width UTF-8 rows of this many bytes.
MAX_KEY_BYTES = 512
# A row past the examples: it goes through every map, then is masked out.
_PADDING_ROW = {'padding': True, 'caption': '', 'hashtags': []}
# Per-row values every process gets, for all rows of each global batch.
ROW_FIELDS = ('valid', 'index', 'label', 'key_bytes')


class _IndexedRows(grain.MapDataset):
  """Row r is example indices[r] of `source` (with its 'index'); rows past them are padding."""

  def __init__(self, source, indices: np.ndarray, length: int):
    super().__init__()
    self._source, self._indices, self._length = source, indices, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, row):
    if isinstance(row, slice):
      return self.slice(row)
    if row >= len(self._indices):
      return _PADDING_ROW
    index = int(self._indices[row])
    return {**self._source[index], 'index': index}

  def __str__(self) -> str:
    return f'IndexedRows({len(self._indices)} examples, {self._length} rows)'


def _encode_key(key: str) -> np.ndarray:
  encoded = key.encode('utf-8')
  if len(encoded) > MAX_KEY_BYTES:
    raise ValueError(f'Example key {key[:80]!r}... is longer than {MAX_KEY_BYTES} bytes.')
  row = np.zeros(MAX_KEY_BYTES, np.uint8)
  row[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  return row


def decode_key(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b'\0').decode('utf-8')


def _ordered_row(example: dict[str, Any], *, image_size: int,
                 crop_fraction: float) -> dict[str, np.ndarray]:
  """A centre-cropped row with ROW_FIELDS; padding and unreadable images are rows with
  valid=False (the batch keeps its shape on every process). Label ids and text tokens,
  when the maps before added them, are kept."""
  blank = np.zeros((image_size, image_size, 3), np.uint8)
  extra = {name: example[name] for name in (batch_features.LABEL_IDS_FEATURE,
                                            batch_features.TEXT_TOKENS_FEATURE)
           if name in example}
  if example.get('padding'):
    return {'image': blank, 'valid': np.bool_(False), 'index': np.int64(-1),
            'label': np.int32(-1), 'key_bytes': np.zeros(MAX_KEY_BYTES, np.uint8), **extra}
  prepared = example_maps.prepare_for_eval(example, image_size=image_size,
                                           crop_fraction=crop_fraction)
  valid = not isinstance(prepared, transforms.SkippedExample)
  if not valid:
    logging.warning('Skipping unreadable image %s (%s).', prepared.path, prepared.reason)
  return {'image': prepared['image'] if valid else blank, 'valid': np.bool_(valid),
          'index': np.int64(example['index']), 'label': np.int32(example.get('label', -1)),
          'key_bytes': _encode_key(example_key(example, example['index'])),
          **extra}


def eval_order(data_config: ml_collections.ConfigDict, num_examples: int) -> np.ndarray:
  """The fixed order evaluators read a split in: shuffled once, independent of the run's
  seed (so evaluations compare across runs), so the first N span every class (image
  folders are listed class by class)."""
  seed = seeds.derive_seed(data_config.seed, seeds.EVAL_SHUFFLE_STREAM)
  return np.random.default_rng(seed).permutation(num_examples)


def local_ordered_batches(source, indices: np.ndarray, data_config: ml_collections.ConfigDict,
                          *, global_batch_size: int):
  """This process's rows of each global batch of `ordered_batches`, as numpy: the device
  features and ROW_FIELDS (for this process's rows only)."""
  per_process = global_batch_size // jax.process_count()
  length = -(-len(indices) // global_batch_size) * global_batch_size
  dataset = _IndexedRows(source, np.asarray(indices), length)
  dataset = example_maps.with_label_ids_and_text_tokens(
      dataset, data_config, *batch_features.load_text_features(data_config))
  dataset = dataset.map(functools.partial(
      _ordered_row, image_size=data_config.image_size,
      crop_fraction=data_config.eval_crop_fraction))
  return process_share.read_process_share(dataset, data_config, per_process).batch(per_process)


def ordered_batches(source, indices: np.ndarray, data_config: ml_collections.ConfigDict, *,
                    global_batch_size: int, mesh: jax.sharding.Mesh):
  """Global batches of the examples `indices` of `source`, in order, each exactly once.

  Yields (batch: the device features of `batch_features.device_feature_names(data_config,
  train=False)` as batch-sharded global arrays; rows: host numpy ROW_FIELDS of
  every row of the global batch, identical on every process). The last batch
  is padded with rows whose 'valid' is False, and an unreadable image is such a
  row too, so every process reads the same number of whole batches and none
  waits in a collective for a batch that never comes.
  """
  sharding = sharding_lib.batch_sharding(mesh)
  device_names = batch_features.device_feature_names(data_config, train=False)
  for local in local_ordered_batches(source, indices, data_config,
                                     global_batch_size=global_batch_size):
    batch = {name: jax.make_array_from_process_local_data(sharding, local[name])
             for name in device_names}
    rows = {name: np.asarray(multihost_utils.process_allgather(local[name], tiled=True))
            if jax.process_count() > 1 else local[name] for name in ROW_FIELDS}
    yield batch, rows
