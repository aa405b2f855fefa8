"""Tests for big_pretrain.data.device_prefetch: same batches, exact positions, errors in order."""

import json
import time

import grain
import jax
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import train_input
from big_pretrain.data.device_prefetch import DevicePrefetch
from helpers.batches import assert_batches_equal, first_devices_mesh, small_data_config

BATCH = 8


def new_pipeline():
  return train_input.InputPipeline(small_data_config(), global_batch_size=BATCH,
                                   mesh=first_devices_mesh(), seed=3)


def prefetched(data, size=3):
  return DevicePrefetch(data.local_batches, data.to_global_arrays, size)


def to_numpy(batches):
  return [jax.device_get(batch) for batch in batches]


def test_gives_the_pipelines_batches_on_device_in_order():
  reference = new_pipeline()
  expected = [reference.next_local_numpy() for _ in range(5)]
  with prefetched(new_pipeline()) as batches:
    got = [next(batches) for _ in range(5)]
  assert all(isinstance(array, jax.Array) for batch in got for array in batch.values())
  assert got[0]['image'].sharding == sharding_lib.batch_sharding(first_devices_mesh())
  assert_batches_equal(expected, to_numpy(got))


def test_position_is_after_the_last_batch_taken_not_after_the_prefetched_ones():
  reference = new_pipeline()
  expected = [reference.next_local_numpy() for _ in range(6)]
  data = new_pipeline()
  with prefetched(data, size=3) as batches:
    for _ in range(2):
      next(batches)
    # Let the thread run ahead: the queue holds 3 more, so the Grain iterator is 5 in.
    deadline = time.monotonic() + 30
    while batches._queue.qsize() < 3 and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)
    saved = json.dumps(batches.position.global_position().to_json())  # as a checkpoint
  resumed = new_pipeline()
  resumed.local_batches.set_state(json.loads(saved))
  assert_batches_equal(expected[2:4], [resumed.next_local_numpy() for _ in range(2)])


def test_restoring_a_position_mid_stream_drops_the_prefetched_batches():
  reference = new_pipeline()
  expected = [reference.next_local_numpy() for _ in range(4)]
  with prefetched(new_pipeline()) as source:
    next(source)
    at_one = source.position.get_state()
  with prefetched(new_pipeline()) as batches:
    for _ in range(3):
      next(batches)
    batches.position.set_state(at_one)
    assert_batches_equal(expected[1:4], to_numpy([next(batches) for _ in range(3)]))


def test_close_rewinds_so_no_batch_is_skipped():
  reference = new_pipeline()
  expected = [reference.next_local_numpy() for _ in range(4)]
  batches = prefetched(new_pipeline())
  got = [next(batches) for _ in range(2)]
  batches.close()
  got += [next(batches) for _ in range(2)]
  batches.close()
  assert_batches_equal(expected, to_numpy(got))


def test_reading_errors_arrive_in_order_after_the_good_batches():
  def fail_at_five(x):
    if x == 5:
      raise ValueError('shard 5 is corrupt')
    return {'x': np.asarray([x])}

  local = grain.MapDataset.range(10).map(fail_at_five).to_iter_dataset().__iter__()
  batches = DevicePrefetch(local, lambda batch: batch, size=2)
  assert [int(next(batches)['x'][0]) for _ in range(5)] == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match='shard 5 is corrupt'):
    next(batches)
  with pytest.raises(StopIteration):
    next(batches)
  batches.close()


def test_a_finite_stream_ends_with_stop_iteration():
  local = grain.MapDataset.range(3).map(lambda x: {'x': np.asarray(x)}).to_iter_dataset()
  with DevicePrefetch(local.__iter__(), lambda batch: batch, size=4) as batches:
    assert [int(batch['x']) for batch in batches] == [0, 1, 2]


def test_rejects_a_size_below_one():
  with pytest.raises(ValueError, match='size >= 1'):
    DevicePrefetch(new_pipeline().local_batches, lambda batch: batch, size=0)
