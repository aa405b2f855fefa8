"""Evaluator registry: config.evals.<name>.kind -> the evaluator class.

Evaluators are declared in the config, built lazily by the loop, and run every
`every_steps` steps (0: only at the end of the stage). A new kind follows the
contract in evaluator.py (`Evaluator`), reads data only through
`Evaluator.split_outputs` (eval_split.py) and compiles only through
`Evaluator.jit`, and is registered below.
"""

from __future__ import annotations

from big_pretrain.evaluators import attentive_probe
from big_pretrain.evaluators import classification
from big_pretrain.evaluators import knn
from big_pretrain.evaluators import linear_probe
from big_pretrain.evaluators import low_shot
from big_pretrain.evaluators import reconstruction
from big_pretrain.evaluators import retrieval
from big_pretrain.evaluators import zero_shot
from big_pretrain.registry import Registry

# An evaluator's name is its config's `kind` (its declared default).
EVALUATORS = Registry('evaluator kind', [
    attentive_probe.AttentiveProbeEvaluator,
    classification.ClassificationEvaluator,
    knn.KnnEvaluator,
    linear_probe.LinearProbeEvaluator,
    low_shot.LowShotEvaluator,
    reconstruction.ReconstructionEvaluator,
    retrieval.RetrievalEvaluator,
    zero_shot.ZeroShotEvaluator,
], name_of=lambda evaluator: evaluator.config_keys['kind'].default)


def evaluator_names() -> list[str]:
  return EVALUATORS.names()


def evaluator_class(kind: str):
  return EVALUATORS[kind]


def evaluator_keys(kind: str):
  """The declared keys of an evaluator of `kind` (its class's config_keys)."""
  return EVALUATORS[kind].config_keys


def evaluator_config(kind: str, **overrides):
  """The full config of an evaluator: its defaults, with `overrides` applied.

  Config files use this so every key exists and can be overridden on the
  command line (--config.evals.knn.k=5).
  """
  config = EVALUATORS[kind].config_keys.defaults()
  config.update(overrides)
  return config


def build_evaluators(stage_config, objective, trainer, workdir):
  """One evaluator per entry of config.evals, in declaration order; missing keys take defaults."""
  return [
      EVALUATORS[eval_config.kind](name, evaluator_config(**eval_config),
                                  stage_config, objective, trainer, workdir)
      for name, eval_config in stage_config.evals.items()
  ]
