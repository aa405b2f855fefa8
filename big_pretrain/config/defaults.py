"""A training stage's config: its keys, gathered from the modules that declare them.

Config files start from `stage_config(objective)` (and `chain_config(...)` for
several stages), so every key exists and can be overridden on the command
line (--config.stages.mae.total_steps=20); validation.py refuses any key they
do not hold and checks every value against its declared rule. Each key is
declared once, with its default, rule and meaning, by the module that reads it:
`stage_keys` lists where each group comes from.
"""

from __future__ import annotations

import ml_collections

from big_pretrain import schema
from big_pretrain import sharding
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.models.vit import ENCODER, MODEL_KEYS
from big_pretrain.objectives import objective_class
from big_pretrain.storage.checkpoints import CHECKPOINT_KEYS
from big_pretrain.train.optim import OPTIM_KEYS

# The schema's version, recorded in every stage's config.json: 2 added this key (a config
# recorded without it is version 1); from 3 on a record holds every key of its version, and
# its checkpoints hold digests (storage/checkpoints.py); 4 added log.example_keys, and its
# checkpoints hold a global data position (data/batch_columns.py). Adding or renaming a key is a new
# version, listed in config/upgrade.py (KEYS_ADDED_IN_VERSION, and a step for a key whose
# default is not what its absence meant).
SCHEMA_VERSION = 4

SCHEMA_VERSION_KEY = schema.Key(
    SCHEMA_VERSION, schema.COUNT,
    'the version of the config schema this config was written for (config/upgrade.py reads '
    'older records)')


def stage_keys(objective: str) -> schema.Group:
  """Every key of a training stage of `objective`, declared: the run's own here, the others
  where they are read."""
  return schema.Group(
      'a training stage',
      schema_version=SCHEMA_VERSION_KEY,
      seed=schema.Key(0, schema.NON_NEGATIVE_COUNT,
                      "the run's seed: the initial parameters and every step's rng"),
      total_steps=schema.Key(1000, schema.COUNT, 'training steps of the stage'),
      batch_size=schema.Key(256, schema.COUNT,
                            'the global batch, over all processes and devices'),
      resume_with_changes=schema.Key(
          False, schema.BOOLEAN,
          'resume a workdir whose checkpoints were trained with other model, objective, '
          'optimizer, batch, seed or data settings (storage/resume_identity.py lists the keys '
          'that may change freely)'),
      model=MODEL_KEYS,                                  # models/vit.py
      objective=objective_class(objective).config_keys,  # objectives/<objective>.py
      data=DATA_KEYS,                                    # data/data_config.py
      optim=OPTIM_KEYS,                                  # train/optim.py
      mesh=sharding.MESH_KEYS,                           # sharding.py
      sharding_rules=sharding.SHARDING_RULES_KEY,
      checkpoint=CHECKPOINT_KEYS,                        # storage/checkpoints.py
      log=schema.Group(
          'logging',
          every_steps=schema.Key(50, schema.COUNT, 'steps per console line and TensorBoard point'),
          example_keys=schema.Key(
              False, schema.BOOLEAN,
              "write each global batch's example keys (a hash of every row's augmented "
              'image: which example, which crop and flip) to example_keys/ in the stage '
              'folder, one file per process: to check which examples each step trained on, '
              'e.g. across a resume on another number of hosts')),
      evals=schema.FreeForm(
          'evaluators by name, each an evaluator_config(kind, ...) (evaluators/)'),
      # Start from an earlier stage's (or any) checkpoint: only the `take` subtrees of params
      # are read; the rest is initialized fresh.
      init_from=schema.Group(
          "parameters to start from: only the `take` subtrees of a checkpoint's params are "
          'read; the rest starts fresh. Used when the stage starts without a checkpoint',
          stage=schema.Key(None, schema.OPTIONAL_TEXT, 'an earlier stage of config.stages',
                           type=str, names_stage='training', path_key='checkpoint'),
          checkpoint=schema.Key(None, schema.OPTIONAL_TEXT,
                                'or a checkpoint: a step folder, a folder of steps, or a '
                                "stage's folder; or public weights: a timm or Hugging Face "
                                'model folder or .safetensors file, a MAE reference .pth, a '
                                'big_vision .npz', type=str),
          take=schema.Key((ENCODER,), schema.texts(), 'the subtrees of params taken'),
      ),
  )


def stage_config(objective: str) -> ml_collections.ConfigDict:
  """A complete stage config for `objective`, every key at its default."""
  return stage_keys(objective).defaults()


def use_embedded_demo_data(config) -> None:
  """Points a stage at the embedded synthetic data at the CPU demo size (`:demo` configs)."""
  config.data.update(source='synthetic', num_examples=20_000, source_image_size=64,
                     image_size=32)


# What every objective's tiny stage starts from (the tests' tiny stages): the
# 2-block, width-64 'mu/8' ViT on 256 synthetic 32x32 images, batch 16, 4 steps, a
# checkpoint and a log line every 2; each objective's tiny_settings() shrink its own parts.
TINY_STAGE = {
    'model.variant': 'mu/8',
    'data.source': 'synthetic',
    'data.num_examples': 256,
    'data.source_image_size': 32,
    'data.image_size': 32,
    'data.num_threads': 2,
    'batch_size': 16,
    'total_steps': 4,
    'optim.lr_per_256': 1e-3,
    'optim.warmup_steps': 1,
    'checkpoint.every_steps': 2,
    'log.every_steps': 2,
}


def tiny_stage_config(objective: str, **overrides) -> ml_collections.ConfigDict:
  """`objective`'s stage at a CPU test size: TINY_STAGE, then the objective's own
  tiny_settings(), then `overrides` ({'a.b': value}, as keyword arguments: pass a dict
  with **)."""
  config = stage_config(objective)
  for settings in (TINY_STAGE, objective_class(objective).tiny_settings(), overrides):
    with_overrides(config, settings)
  return config


def with_overrides(config, overrides: dict):
  """`config` with {'a.b': value} set in place; returned."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    group = config
    for parent in parents:
      group = group[parent]
    group[leaf] = value
  return config


def chain_config(**stages: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config whose `stages` run in the order given (a plain ConfigDict iterates its keys
  sorted by name, which would run 'finetune' before 'mae')."""
  config = ml_collections.ConfigDict()
  config.stages = ml_collections.ConfigDict(sort_keys=False)
  for name, stage in stages.items():
    config.stages[name] = stage
  return config
