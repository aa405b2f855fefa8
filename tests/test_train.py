"""The generic train step: sharded == single device, real sharding, exact resume, no host
syncs."""

import re

import jax
import ml_collections
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.data.train_input import InputPipeline
from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.objectives import objective_class
from big_pretrain.train.loop import train_stage
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.remat_choice import build_with_remat_choice
from big_pretrain.train.step import ShardedTrainer
from helpers.tiny_config import one_device, tiny_mae_config, tiny_trainer
from helpers.trees import assert_trees_equal


def _run_steps(config, devices, num_steps, num_slices=None):
  """Trains num_steps on `devices`; returns (losses, final params as numpy, trainer, state)."""
  _, trainer = tiny_trainer(config, devices, num_slices)
  data = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=trainer.mesh,
                       seed=config.seed)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = trainer.init_state(init_rng)
  losses = []
  for _ in range(num_steps):
    state, metrics = trainer.train_step(state, next(data), step_rng)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), trainer, state


@pytest.mark.integration
def test_eight_devices_data_fsdp_tensor_equal_one_device():
  assert jax.device_count() == 8, 'tests/conftest.py should give 8 fake CPU devices'
  config = tiny_mae_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  sharded_losses, sharded_params, _, state = _run_steps(config, jax.devices(), 3)
  # The tensor axis splits the MLP's hidden units (and the heads); fsdp its input dimension.
  fc1 = state.params['encoder']['transformer']['block_0']['mlp']['fc1']['kernel']
  assert {shard.data.shape for shard in fc1.addressable_shards} == {(32, 128)}
  config.mesh.update(data=1, fsdp=1, tensor=1)
  single_losses, single_params, _, _ = _run_steps(config, jax.devices()[:1], 3)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  assert sharded_losses[0] != sharded_losses[-1]  # it trained
  # Reduction order differs across devices; Adam amplifies it where gradients
  # are ~0. One update is ~6e-5 here, so 1e-5 still catches any real difference.
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      sharded_params, single_params)


@pytest.mark.integration
def test_two_slices_split_the_data_axis_keep_fsdp_inside_one_and_train_as_one_device():
  """Multi-slice (TPU slices joined by the data-centre network), simulated: the 8 devices as
  2 slices of 4. The data axis spans the slices; an FSDP group never crosses one."""
  config = tiny_mae_config()
  config.mesh.update(data=4, fsdp=2, tensor=1)
  losses, params, trainer, _ = _run_steps(config, jax.devices(), 2, num_slices=2)
  slice_of = {device: index // 4 for index, device in enumerate(jax.devices())}
  rows = trainer.mesh.devices[:, :, 0]
  assert [{slice_of[d] for d in row} for row in rows] == [{0}, {0}, {1}, {1}]
  config.mesh.update(data=1, fsdp=1, tensor=1)
  single_losses, single_params, _, _ = _run_steps(config, jax.devices()[:1], 2)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)  # as the 2 x 2 x 2 test above
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, single_params)
  with pytest.raises(ValueError, match=r'data must be a multiple of 2'):
    sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)),
                           jax.devices(), num_slices=2)


def test_parameters_and_optimizer_state_are_really_sharded():
  config = tiny_mae_config()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  # As created: the step keeps these layouts (checked after steps on the 2 x 2 x 2 mesh above).
  _, _, trainer, state = _run_steps(config, jax.devices(), 0)
  fc1 = state.params['encoder']['transformer']['block_0']['mlp']['fc1']['kernel']
  assert fc1.shape == (64, 256)
  assert {shard.data.shape for shard in fc1.addressable_shards} == {(8, 256)}
  query = state.params['encoder']['transformer']['block_0']['attention']['query']['kernel']
  assert {shard.data.shape for shard in query.addressable_shards} == {(8, 4, 16)}
  # Adam's first moment is laid out like the parameter it tracks.
  adam_mu = jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
  mu = next(s.mu for s in adam_mu if hasattr(s, 'mu'))
  mu_fc1 = mu['encoder']['transformer']['block_0']['mlp']['fc1']['kernel']
  assert {shard.data.shape for shard in mu_fc1.addressable_shards} == {(8, 256)}
  # Every array in the state is no bigger per device than 1/8 of its width when sharded.
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(state.params))
  assert per_device < 0.2 * total


@pytest.mark.integration
def test_stopped_and_resumed_run_is_bit_identical(tmp_path):
  config = tiny_mae_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  uninterrupted = train_stage(config, str(tmp_path / 'straight'))
  first = train_stage(config, str(tmp_path / 'resumed'), stop_after_steps=3)
  assert first.steps_run == 3 and not first.finished
  second = train_stage(config, str(tmp_path / 'resumed'))
  assert second.steps_run == 3 and second.finished
  straight = jax.device_get(uninterrupted.state.params)
  resumed = jax.device_get(second.state.params)
  assert_trees_equal(straight, resumed)
  assert uninterrupted.last_metrics['loss'] == second.last_metrics['loss']
  # Speed is logged with every interval: throughput and MFU against the CPU's measured peak.
  speed = second.last_metrics
  assert speed['images_per_sec'] > 0 and speed['model_tflops_per_sec_per_device'] > 0
  assert 0 < speed['mfu'] < 1
  # A finished stage run again does nothing and keeps its checkpoint.
  again = train_stage(config, str(tmp_path / 'resumed'))
  assert again.steps_run == 0 and again.finished


@pytest.mark.integration
def test_checkpoint_that_does_not_fit_names_the_parameter(tmp_path):
  config = tiny_mae_config(total_steps=1)
  train_stage(config, str(tmp_path), devices=one_device())
  wider = tiny_mae_config(total_steps=2)
  wider.objective.decoder_width = 64
  wider.resume_with_changes = True  # past the config check, to the checkpoint's shapes
  with pytest.raises(CheckpointMismatchError, match=r'decoder/embed/kernel.*\(64, 32\).*\(64, 64\)'):
    train_stage(wider, str(tmp_path), devices=one_device())
  assert (tmp_path / 'checkpoints' / '1').exists()  # nothing lost


@pytest.mark.integration
def test_the_step_never_waits_for_the_host(tmp_path, monkeypatch):
  """The step as the loop builds it: no host callback or host transfer in its program, the
  state donated (updated in place), no transfer inside the call, and the loop reads no
  device value between steps except at log (and save) steps."""
  config = tiny_mae_config(total_steps=6)
  config.log.every_steps = 3
  config.checkpoint.every_steps = 100  # saved at the final step only
  mesh = sharding_lib.make_mesh(config.mesh, one_device())
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  built = build_with_remat_choice(
      objective_class('mae').resolve_config(config), mesh, sharding_lib.logical_axis_rules(config),
      make_optimizer(config.optim, schedule), schedule,
      global_batch_shapes(config.data, config.batch_size))
  program = built.trainer.compile_step(global_batch_shapes(config.data, config.batch_size)).as_text()
  # Host callbacks (jax.debug.print, pure_callback, io_callback) and host transfers.
  assert not re.search(r'custom_call_target="[^"]*callback|\b(outfeed|infeed|send|recv)\(',
                       program)
  # Every state leaf (the first parameters) shares its buffer with an output: the donation
  # reached XLA, which updates the state in place.
  header = program.splitlines()[0]
  aliased = {int(p) for p in re.findall(r'\{\d+\}: \((\d+), \{\}, may-alias\)', header)}
  assert aliased == set(range(len(jax.tree_util.tree_leaves(built.trainer.abstract_state))))

  # The loop: device values read (a CPU array's host copy is free, so the transfer guards
  # cannot see reads here; jax.Array._value is where every read goes through) between
  # consecutive steps, each step run under the guards (no implicit transfer either way).
  array_class = type(jax.numpy.zeros(()))
  read_value = array_class._value.fget
  reads, reads_at_step = [0], []

  def counted_read(self):
    reads[0] += 1
    return read_value(self)

  def guarded_step(self, state, batch, base_rng):
    reads_at_step.append(reads[0])
    with jax.transfer_guard('disallow'):
      return unguarded_step(self, state, batch, base_rng)

  unguarded_step = ShardedTrainer.train_step
  monkeypatch.setattr(array_class, '_value', property(counted_read))
  monkeypatch.setattr(ShardedTrainer, 'train_step', guarded_step)
  config.evals = {}
  result = train_stage(config, str(tmp_path), devices=one_device())
  assert result.steps_run == 6 and len(reads_at_step) == 6
  between_steps = np.diff(reads_at_step)  # [i]: reads after step i + 1, before step i + 2
  # Step 1 is saved (Orbax's first step in a new directory) after its metrics are checked
  # for NaNs; step 3 logs them. Steps 2, 4 and 5 read nothing.
  assert between_steps[0] > 0 and between_steps[2] > 0
  assert list(between_steps[[1, 3, 4]]) == [0, 0, 0], between_steps
