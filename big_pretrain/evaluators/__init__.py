"""Evaluator registry: config.evals.<name>.kind -> the evaluator class.

Evaluators are declared in the config, built lazily by the loop, and run every
`every_steps` steps (0: only at the end of the stage). A new kind follows the
contract in evaluator.py (`Evaluator`), reads data only through
`Evaluator.split_outputs` (eval_split.py) and compiles only through
`Evaluator.jit`, and is registered below.
"""

from __future__ import annotations

import types

from big_pretrain.evaluators import attentive_probe
from big_pretrain.evaluators import classification
from big_pretrain.evaluators import knn
from big_pretrain.evaluators import linear_probe
from big_pretrain.evaluators import low_shot
from big_pretrain.evaluators import reconstruction
from big_pretrain.evaluators import retrieval
from big_pretrain.evaluators import zero_shot

_REGISTRY = types.MappingProxyType({
    'attentive_probe': attentive_probe.AttentiveProbeEvaluator,
    'classification': classification.ClassificationEvaluator,
    'knn': knn.KnnEvaluator,
    'linear_probe': linear_probe.LinearProbeEvaluator,
    'low_shot': low_shot.LowShotEvaluator,
    'reconstruction': reconstruction.ReconstructionEvaluator,
    'retrieval': retrieval.RetrievalEvaluator,
    'zero_shot': zero_shot.ZeroShotEvaluator,
})


def evaluator_names() -> list[str]:
  return sorted(_REGISTRY)


def evaluator_class(kind: str):
  return _REGISTRY[kind]


def evaluator_keys(kind: str):
  """The declared keys of an evaluator of `kind` (its class's config_keys)."""
  return _REGISTRY[kind].config_keys


def evaluator_config(kind: str, **overrides):
  """The full config of an evaluator: its defaults, with `overrides` applied.

  Config files use this so every key exists and can be overridden on the
  command line (--config.evals.knn.k=5).
  """
  if kind not in _REGISTRY:
    raise ValueError(f'Unknown evaluator kind {kind!r}; choose one of {evaluator_names()}.')
  config = _REGISTRY[kind].config_keys.defaults()
  config.update(overrides)
  return config


def build_evaluators(stage_config, objective, trainer, workdir):
  """One evaluator per entry of config.evals, in declaration order; missing keys take defaults."""
  return [
      _REGISTRY[eval_config.kind](name, evaluator_config(**eval_config),
                                  stage_config, objective, trainer, workdir)
      for name, eval_config in stage_config.evals.items()
  ]
