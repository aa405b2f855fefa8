"""Evaluator registry: config.evals.<name>.kind -> the evaluator class.

Evaluators are declared in the config, built lazily by the loop, and run every
`every_steps` steps (0: only at the end of the stage).
"""

from __future__ import annotations

import types

from big_pretrain.evaluators import knn
from big_pretrain.evaluators import linear_probe
from big_pretrain.evaluators import reconstruction

_REGISTRY = types.MappingProxyType({
    'knn': knn.KnnEvaluator,
    'linear_probe': linear_probe.LinearProbeEvaluator,
    'reconstruction': reconstruction.ReconstructionEvaluator,
})


def evaluator_names() -> list[str]:
  return sorted(_REGISTRY)


def evaluator_defaults(kind: str):
  return _REGISTRY[kind].default_config()


def build_evaluators(stage_config, objective, trainer, workdir):
  """One evaluator per entry of config.evals, in declaration order."""
  return [
      _REGISTRY[eval_config.kind](name, eval_config, stage_config, objective, trainer, workdir)
      for name, eval_config in stage_config.evals.items()
  ]
