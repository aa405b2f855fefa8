"""Sharding you can measure: per-device bytes from the compiled step, and the start-up table."""

import jax
import ml_collections
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from helpers.tiny_config import tiny_mae_config, tiny_trainer


def _trainer(mesh_shape: dict):
  config = tiny_mae_config()
  config.mesh.update(**mesh_shape)
  _, trainer = tiny_trainer(config, jax.devices())
  size = config.data.image_size
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), np.uint8),
           'label': jax.ShapeDtypeStruct((config.batch_size,), np.int32)}
  return trainer, batch


def _nbytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.integration
def test_fsdp_over_8_devices_holds_an_eighth_of_the_state_per_device():
  data_parallel, batch = _trainer(dict(data=8, fsdp=1, tensor=1))
  fsdp, _ = _trainer(dict(data=1, fsdp=8, tensor=1))
  # The compiled step's inputs on one device: train state (params + Adam moments) + batch shard.
  dp_bytes = data_parallel.compile_step(batch).memory_analysis().argument_size_in_bytes
  fsdp_bytes = fsdp.compile_step(batch).memory_analysis().argument_size_in_bytes

  state_bytes = _nbytes(fsdp.abstract_state)
  batch_bytes = _nbytes(batch)
  assert dp_bytes >= state_bytes  # data parallel: every device holds the whole state
  # FSDP: 1/8 of it, plus what is too small to shard (biases, norms: replicated) and
  # the device's batch rows.
  unsharded_bytes = sum(
      leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(fsdp.abstract_state)
      if all(axis is None for axis in leaf.sharding.spec))
  assert unsharded_bytes < 0.03 * state_bytes
  assert fsdp_bytes <= (state_bytes - unsharded_bytes) / 8 + unsharded_bytes + batch_bytes
  assert fsdp_bytes <= dp_bytes / 8 * 1.15


@pytest.mark.parametrize('mesh_shape, sharded_over', [
    (dict(data=8, fsdp=1, tensor=1), 1),
    (dict(data=1, fsdp=8, tensor=1), 8),
    (dict(data=2, fsdp=2, tensor=2), 4),
])
def test_startup_table_shows_shardings_and_bytes_per_device(mesh_shape, sharded_over):
  trainer, _ = _trainer(mesh_shape)
  state = trainer.init_state(jax.random.key(0))
  table = sharding_lib.describe_param_shardings(state.params, state.opt_state)
  fc1_row = next(line for line in table.splitlines() if 'block_0/mlp/fc1/kernel' in line)
  fc1_bytes = 64 * 256 * 4
  assert float(fc1_row.split()[-1]) == pytest.approx(fc1_bytes / sharded_over / 2**20, abs=0.005)
  if sharded_over > 1:
    assert 'fsdp' in fc1_row
  params_mib_per_device = float(table.splitlines()[-2].split()[-5])
  assert params_mib_per_device == pytest.approx(
      sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state.params))
      / 2**20, abs=0.05)
  assert 'Optimizer state' in table.splitlines()[-1]


def test_over_several_slices_the_mesh_is_one_slices_and_only_data_crosses_them():
  # MAWS 2B's mesh (FSDP over all of a slice's chips) over 2 simulated slices of 4 devices:
  # -1 is resolved within one slice, and the data axis spans the two.
  devices = jax.devices()
  mesh_config = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  assert sharding_lib.resolve_mesh_shape(mesh_config, 8, num_slices=2) == (2, 4, 1)
  mesh = sharding_lib.make_mesh(mesh_config, devices, num_slices=2)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert sharding_lib.cross_slice_axes(mesh, num_slices=2) == ('data',)
  assert [{d.id // 4 for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  # A mesh written for every slice's devices is taken as it is; on one slice, -1 is all.
  assert sharding_lib.resolve_mesh_shape(
      ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)), 8, num_slices=2) == (4, 2, 1)
  assert sharding_lib.resolve_mesh_shape(mesh_config, 8) == (1, 8, 1)
  assert sharding_lib.cross_slice_axes(sharding_lib.make_mesh(mesh_config, devices)) == ()
  with pytest.raises(ValueError, match=r'does not divide the 4 devices of a slice \(2 slices\)'):
    sharding_lib.resolve_mesh_shape(
        ml_collections.ConfigDict(dict(data=-1, fsdp=3, tensor=1)), 8, num_slices=2)
