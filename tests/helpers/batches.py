"""Small input pipelines: their data config, a mesh to lay them on, and reading batches."""

import jax
import numpy as np

from big_pretrain.data import eval_input
from big_pretrain.data import sources
from big_pretrain.data.data_config import default_data_config

IMAGE_SIZE = 32  # small_data_config's image_size


def first_devices_mesh(shape=(1, 1, 1)):
  """A (data, fsdp, tensor) mesh of `shape` over the first prod(shape) devices."""
  num_devices = int(np.prod(shape))
  return jax.make_mesh(
      shape, ('data', 'fsdp', 'tensor'),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
      devices=jax.devices()[:num_devices])


def small_data_config(**overrides):
  """config.data for 200 synthetic 48x48 images at IMAGE_SIZE, 2 threads; then `overrides`."""
  config = default_data_config()
  config.num_examples = 200
  config.source_image_size = 48
  config.image_size = IMAGE_SIZE
  config.num_threads = 2
  config.prefetch_buffer_size = 16
  config.update(overrides)
  return config


def take(data_pipeline, num_batches):
  """The next `num_batches` host batches of `data_pipeline`."""
  return [data_pipeline.next_local_numpy() for _ in range(num_batches)]


def eval_split_batches(data_config, global_batch_size):
  """This process's rows of every batch an evaluator reads of `data_config`'s split
  (eval_input.ordered_batches: every example once, in the fixed evaluation order, the last
  batch padded), as numpy: the device features and eval_input.ROW_FIELDS."""
  source = sources.build_source(data_config)
  order = eval_input.eval_order(data_config, len(source))
  return list(eval_input.local_ordered_batches(source, order, data_config,
                                               global_batch_size=global_batch_size))


def valid_rows(batches, feature):
  """`feature` of the rows of eval_split_batches that hold a readable image, concatenated."""
  return np.concatenate([batch[feature][batch['valid']] for batch in batches])


def unreadable_rows(batches) -> int:
  """The rows of eval_split_batches whose image did not read (padding rows not counted)."""
  return int(sum(((~batch['valid']) & (batch['index'] >= 0)).sum() for batch in batches))


def assert_batches_equal(expected, actual):
  """The same number of batches, with the same features and the same values."""
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
