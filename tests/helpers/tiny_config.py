"""The tiny stage configs the tests train, and their trainers: each objective's own tiny stage
(config.defaults.tiny_stage_config: 2 layers, width 64, 32x32, patch 8) with what a test needs.

Also main.py's --config for the tiny MAE stage (helpers.paths.TINY_CONFIG_FILE): it imports
nothing but big_pretrain, so that it loads as a file on its own.
"""

import jax

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import stage_config, tiny_stage_config, with_overrides
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.evaluators import evaluator_config
from big_pretrain.objectives import build_objective
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.step import build_trainer


def one_device():
  """For tests that are not about sharding: a 1-device mesh compiles and checkpoints
  about a quarter faster than conftest's 8 fake devices."""
  return jax.devices()[:1]


def tiny_mae_config(**overrides):
  """The tiny MAE stage (config.defaults.tiny_stage_config), 6 steps; then `overrides`
  ({'a.b': value})."""
  return tiny_stage_config('mae', **{'total_steps': 6, 'optim.warmup_steps': 2, **overrides})


def get_config(arg=None):
  """For main.py (--config=tests/helpers/tiny_config.py): the tiny MAE stage."""
  del arg
  return tiny_mae_config()


def tiny_finetune_config(**overrides):
  """Fine-tuning the same tiny encoder (GAP) on the synthetic shapes' 10 classes."""
  return tiny_stage_config('finetune', **overrides)


def tiny_trainer(config, devices, num_slices=None):
  """(objective, trainer) of a stage config on `devices`, laid out as config.mesh says (over
  `num_slices` simulated slices, each a block of the devices, if given)."""
  mesh = sharding_lib.make_mesh(config.mesh, devices, num_slices=num_slices)
  objective = build_objective(config)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  trainer = build_trainer(objective, make_optimizer(config.optim, schedule), schedule, mesh,
                          sharding_lib.logical_axis_rules(config))
  return objective, trainer


def one_device_trainer(config):
  """The trainer of a stage config on one_device()."""
  return tiny_trainer(config, one_device())[1]


def tiny_multiprocess_config():
  """The tiny MAE stage over a 2x2 (data, fsdp) mesh: 2 processes x 2 devices, or 1 x 4."""
  config = tiny_mae_config(batch_size=8, total_steps=4)
  config.mesh.update(data=2, fsdp=2, tensor=1)
  config.data.num_examples = 64
  config.log.every_steps = 1
  return config


def tiny_teacher_config(**overrides):
  """The tiny classifier trained on a quarter of 256 synthetic images (the labelled part)."""
  config = tiny_finetune_config(**{'data.subset.fraction': 0.25, 'total_steps': 2})
  config.objective.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  return with_overrides(config, overrides)


def tiny_pseudo_label_config(**overrides):
  """Pseudo-labels for the other three quarters (192 images): 3 shards of 64, batch 16."""
  from big_pretrain.stages import pseudo_label_job  # pylint: disable=import-outside-toplevel
  config = pseudo_label_job.default_config()
  config.teacher.workdir = 'set by the test'
  config.data.update(source='synthetic', num_examples=256, source_image_size=32, num_threads=2)
  config.data.subset.update(fraction=0.25, complement=True)
  config.batch_size = 16
  config.examples_per_shard = 64
  config.labels.update(kind='soft', top_k=3)
  return with_overrides(config, overrides)


def tiny_student_config(pseudo_labels: str, **overrides):
  """The tiny classifier on the labelled quarter and the pseudo-labels in `pseudo_labels`."""
  config = tiny_teacher_config()
  config.objective = stage_config('self_training').objective
  config.data.pseudo_labels.path = pseudo_labels
  return with_overrides(config, overrides)


def tiny_flip_config():
  """FLIP with the tiny image tower (GAP, half the patches masked) and a 1-block text tower."""
  return tiny_stage_config('flip')


def tiny_wsp_config(**model):
  """WSP on the synthetic hashtags with the tiny encoder, 2 steps; `model` overrides
  config.model."""
  return tiny_stage_config('wsp', total_steps=2, **{f'model.{key}': value
                                                   for key, value in model.items()})


def tiny_mae_with_evaluator_on_eight_devices(kind: str, **settings):
  """(config, objective, trainer): the tiny MAE stage with one evaluator (`kind`, `settings`),
  validated, over all 8 devices as a (data 2, fsdp 4) mesh."""
  config = tiny_mae_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  config.evals[kind] = evaluator_config(kind, **settings)
  validate_stage_config(config)
  objective, trainer = tiny_trainer(config, jax.devices())
  return config, objective, trainer
