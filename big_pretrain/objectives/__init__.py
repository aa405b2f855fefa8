"""Objective registry: config.objective.name -> the class that implements it (objective.py
has the contract)."""

from __future__ import annotations

import types

from big_pretrain.objectives import aim, finetune, flip, lit, mae, self_training, wsp

# Read-only: a name maps to its Objective class.
_REGISTRY = types.MappingProxyType({
    objective.name: objective
    for objective in (mae.MAE, wsp.WSP, flip.FLIP, lit.LiT, aim.AIM, finetune.Finetune,
                      self_training.SelfTrainingStudent)
})


def objective_names() -> list[str]:
  return sorted(_REGISTRY)


def objective_class(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective {name!r}; choose one of {objective_names()}.')
  return _REGISTRY[name]


def objective_defaults(name: str):
  """config.objective of `name` with every key at its default."""
  return objective_class(name).config_keys.defaults()


def build_objective(config):
  """The Objective for a (validated) stage config."""
  return _REGISTRY[config.objective.name](config)
