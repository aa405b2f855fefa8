"""The tiny stage configs the tests train (2 layers, width 64, 32x32, patch 8), and their trainers.

Also main.py's --config for the tiny MAE stage (helpers.paths.TINY_CONFIG_FILE): it imports
nothing but big_pretrain, so that it loads as a file on its own.
"""

import jax

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import stage_config
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data.text.labels import synthetic_vocabulary_path
from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
from big_pretrain.evaluators import evaluator_config
from big_pretrain.objectives import build_objective
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.step import build_trainer


def one_device():
  """For tests that are not about sharding: a 1-device mesh compiles and checkpoints
  about a quarter faster than conftest's 8 fake devices."""
  return jax.devices()[:1]


def tiny_mae_config(**overrides):
  """MAE on 256 synthetic 32x32 images, batch 16, 6 steps; then `overrides` ({'a.b': value})."""
  config = stage_config('mae')
  config.model.variant = 'mu/8'
  config.objective.decoder_width = 32
  config.objective.decoder_depth = 1
  config.objective.decoder_heads = 4
  config.batch_size = 16
  config.total_steps = 6
  config.optim.lr_per_256 = 1e-3
  config.optim.warmup_steps = 2
  config.data.source = 'synthetic'
  config.data.num_examples = 256
  config.data.source_image_size = 32
  config.data.image_size = 32
  config.data.num_threads = 2
  config.checkpoint.every_steps = 2
  config.log.every_steps = 2
  return with_overrides(config, overrides)


def get_config(arg=None):
  """For main.py (--config=tests/helpers/tiny_config.py): the tiny MAE stage."""
  del arg
  return tiny_mae_config()


def tiny_finetune_config(**overrides):
  """Fine-tuning the same tiny encoder (GAP) on the synthetic shapes' 10 classes."""
  config = stage_config('finetune')
  config.model.update(variant='mu/8', pool='gap')
  config.data.update(source='synthetic', num_examples=256, source_image_size=32, image_size=32,
                     num_threads=2)
  config.batch_size = 16
  config.total_steps = 4
  config.optim.update(lr_per_256=1e-3, warmup_steps=1)
  config.checkpoint.every_steps = 2
  config.log.every_steps = 2
  return with_overrides(config, overrides)


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


def with_overrides(config, overrides: dict):
  """config with {'a.b': value} applied."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


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
  config = stage_config('flip')
  config.model.update(variant='mu/8', use_cls_token=False, pool='gap')
  config.objective.update(mask_ratio=0.5, embed_dim=32, text_width=32, text_depth=1, text_heads=4)
  config.data.update(source='synthetic', num_examples=256, source_image_size=32, image_size=32,
                     num_threads=2)
  config.data.text.tokenizer = synthetic_tokenizer_path()
  config.data.text.max_length = 16
  config.batch_size = 16
  config.total_steps = 4
  config.optim.update(lr_per_256=1e-3, warmup_steps=1)
  return config


def tiny_wsp_config(**model):
  """WSP on the synthetic hashtags with the tiny encoder; `model` overrides config.model."""
  config = stage_config('wsp')
  config.model.variant = 'mu/8'
  config.model.update(model)
  config.data.update(source='synthetic', num_examples=256, source_image_size=32, image_size=32)
  config.data.labels.vocabulary = synthetic_vocabulary_path()
  config.batch_size = 16
  config.total_steps = 2
  return config


def tiny_mae_with_evaluator_on_eight_devices(kind: str, **settings):
  """(config, objective, trainer): the tiny MAE stage with one evaluator (`kind`, `settings`),
  validated, over all 8 devices as a (data 2, fsdp 4) mesh."""
  config = tiny_mae_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  config.evals[kind] = evaluator_config(kind, **settings)
  validate_stage_config(config)
  objective, trainer = tiny_trainer(config, jax.devices())
  return config, objective, trainer
