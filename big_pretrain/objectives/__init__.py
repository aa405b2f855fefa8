"""Objective registry: config.objective.name -> the module that implements it."""

from __future__ import annotations

import types

from big_pretrain.objectives import aim, finetune, flip, lit, mae, self_training, wsp

# Read-only: a name maps to (Objective class, default config factory).
_REGISTRY = types.MappingProxyType({
    'mae': (mae.MAE, mae.default_config),
    'wsp': (wsp.WSP, wsp.default_config),
    'flip': (flip.FLIP, flip.default_config),
    'lit': (lit.LiT, lit.default_config),
    'aim': (aim.AIM, aim.default_config),
    'finetune': (finetune.Finetune, finetune.default_config),
    'self_training': (self_training.SelfTrainingStudent, self_training.default_config),
})


def objective_names() -> list[str]:
  return sorted(_REGISTRY)


def objective_defaults(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective {name!r}; choose one of {objective_names()}.')
  return _REGISTRY[name][1]()


def objective_class(name: str):
  return _REGISTRY[name][0]


def build_objective(config):
  """The Objective for a (validated) stage config."""
  objective_cls, _ = _REGISTRY[config.objective.name]
  return objective_cls(config)
