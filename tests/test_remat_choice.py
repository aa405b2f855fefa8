"""model.remat='auto': the least remat whose compiled train step fits the device's memory.

A CPU reports no memory limit, so tests that need one patch
remat_choice.device_memory_limit. The model is scanned: on a CPU, XLA frees
rematerialised activations of scanned layers, not of unrolled ones.
"""

import contextlib
import dataclasses
import logging

import jax
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import tiny_stage_config
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.objectives import build_objective
from big_pretrain.train import remat_choice
from big_pretrain.train.loop import train_stage
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.step import ShardedTrainer, build_trainer
from helpers.tiny_config import one_device, tiny_mae_config
from helpers.trees import assert_trees_equal


def _config():
  """A tiny AIM stage (it compiles faster than MAE) on one device."""
  return tiny_stage_config('aim', **{'model.scan': True, 'model.remat': 'auto', 'batch_size': 8,
                                     'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1})


def _choose(config):
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  return remat_choice.build_with_remat_choice(
      config, mesh, sharding_lib.logical_axis_rules(config),
      make_optimizer(config.optim, schedule), schedule,
      global_batch_shapes(config.data, config.batch_size))


def _set_memory_limit(monkeypatch, num_bytes):
  monkeypatch.setattr(remat_choice, 'device_memory_limit', lambda device: num_bytes)


@contextlib.contextmanager
def _absl_warnings():
  """The absl WARNING messages logged inside (absl logs through the 'absl' logger)."""
  messages = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = lambda record: messages.append(record.getMessage())
  logging.getLogger('absl').addHandler(handler)
  try:
    yield messages
  finally:
    logging.getLogger('absl').removeHandler(handler)


@pytest.fixture(scope='module')
def nothing_fits():
  """The choice when no policy fits (a device that holds the parameters and optimizer state,
  and not one byte more: below that, nothing would be compiled): every candidate compiled
  and measured."""
  mesh = sharding_lib.make_mesh(_config().mesh, jax.devices()[:1])
  objective = build_objective(_config())
  schedule = make_schedule(_config().optim, 8, 1000)
  state = remat_choice.state_bytes_per_device(build_trainer(
      objective, make_optimizer(_config().optim, schedule), schedule, mesh,
      sharding_lib.logical_axis_rules(_config())))
  with pytest.MonkeyPatch.context() as monkeypatch:
    _set_memory_limit(monkeypatch, int(state / remat_choice.MEMORY_FRACTION) + 1)
    with _absl_warnings() as warnings:
      choice = _choose(_config())
  return choice, warnings


def test_state_alone_too_large_for_the_device_compiles_nothing(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('the parameters alone overflow the device: nothing to compile')
  monkeypatch.setattr(ShardedTrainer, 'compile_step', refuse)
  _set_memory_limit(monkeypatch, 1)
  with _absl_warnings() as warnings:
    choice = _choose(_config())
  assert not choice.fits and set(choice.step_bytes) == {'state alone'}
  assert any('no remat policy can fit' in w and 'mesh.fsdp' in w for w in warnings), warnings


def test_no_memory_limit_means_no_remat_and_no_compile(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('nothing should be compiled without a memory limit')
  monkeypatch.setattr(ShardedTrainer, 'compile_step', refuse)
  assert jax.devices()[0].memory_stats() is None  # a CPU says nothing
  config = _config()
  choice = _choose(config)
  assert choice.policy == 'none' and choice.step_bytes == {}
  assert choice.trainer.compiled_step is None
  assert config.model.remat == 'auto'  # the caller's config is left as it was


@pytest.mark.integration
def test_nothing_fits_takes_the_smallest_full_and_says_what_to_do(nothing_fits):
  choice, warnings = nothing_fits
  assert set(choice.step_bytes) == {'none', 'dots', 'full'}
  assert choice.step_bytes['full'] < choice.step_bytes['dots'] < choice.step_bytes['none']
  assert choice.policy == 'full'
  assert any('mesh.fsdp' in w and 'batch_size' in w and 'GiB' in w for w in warnings), warnings


@pytest.mark.integration
def test_takes_the_least_remat_that_fits(monkeypatch, nothing_fits):
  measured = nothing_fits[0].step_bytes
  budget = (measured['none'] + measured['dots']) // 2  # 'none' does not fit, 'dots' does
  limit = int(budget / remat_choice.MEMORY_FRACTION) + 1
  _set_memory_limit(monkeypatch, limit)
  choice = _choose(_config())
  assert choice.policy == 'dots'
  assert choice.step_bytes['dots'] <= remat_choice.MEMORY_FRACTION * limit
  assert choice.step_bytes['none'] > remat_choice.MEMORY_FRACTION * limit
  assert 'full' not in choice.step_bytes  # not compiled: 'dots' was enough
  assert choice.config.model.remat == 'dots' and choice.objective.model.encoder.remat == 'dots'

  # The measured compilation is the one that runs: without the jit, the step still steps.
  trainer = dataclasses.replace(choice.trainer, jitted_step=None)
  batch = {name: jax.device_put(np.zeros(shape.shape, shape.dtype),
                                sharding_lib.batch_sharding(trainer.mesh))
           for name, shape in global_batch_shapes(choice.config.data, 8).items()}
  state = trainer.init_state(jax.random.key(0))
  _, metrics = trainer.train_step(state, batch, jax.random.key(1))
  assert np.isfinite(metrics['loss'])


@pytest.mark.integration
def test_loop_with_auto_remat_trains_as_without_remat(monkeypatch, tmp_path):
  # tests/test_faults.py's stage, on one device as there: the suite compiles its programs
  # once (conftest's cache).
  config = tiny_mae_config(total_steps=8)
  config.model.remat = 'none'
  without = train_stage(config, str(tmp_path / 'none'), stop_after_steps=4, devices=one_device())
  # A device with memory to spare: 'auto' measures 'none', which fits, and the
  # loop runs the step compiled for the measurement, on a fresh state and on a
  # restored one.
  _set_memory_limit(monkeypatch, 2 ** 40)
  config.model.remat = 'auto'
  train_stage(config, str(tmp_path / 'auto'), stop_after_steps=2, devices=one_device())
  auto = train_stage(config, str(tmp_path / 'auto'), stop_after_steps=2, devices=one_device())
  assert auto.steps_run == 2
  assert auto.last_metrics['loss'] == without.last_metrics['loss']
  assert_trees_equal(jax.device_get(auto.state.params), jax.device_get(without.state.params))


def test_global_batch_shapes_are_those_of_the_pipeline(tmp_path):
  from big_pretrain.data.train_input import InputPipeline
  from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
  data_config = tiny_mae_config().data
  vocabulary = tmp_path / 'labels.txt'
  vocabulary.write_text('circle\nsquare\nred\n')
  data_config.labels.update(vocabulary=str(vocabulary), max_labels_per_example=3)
  data_config.text.update(tokenizer=synthetic_tokenizer_path(), max_length=12)
  mesh = sharding_lib.make_mesh(tiny_mae_config(**{'mesh.data': 1}).mesh, jax.devices()[:1])
  batch = next(InputPipeline(data_config, global_batch_size=4, mesh=mesh))
  expected = {name: (array.shape, array.dtype) for name, array in batch.items()}
  assert set(expected) == {'image', 'label', 'label_ids', 'text_tokens'}
  assert {name: (shape.shape, shape.dtype)
          for name, shape in global_batch_shapes(data_config, 4).items()} == expected
