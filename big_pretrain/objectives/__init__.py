"""Objective registry: config.objective.name -> the class that implements it (objective.py
has the contract). A new objective is its module and one line in OBJECTIVES."""

from __future__ import annotations

from big_pretrain.objectives import aim, finetune, flip, lit, mae, self_training, wsp
from big_pretrain.objectives.objective import CAPABILITIES, Capability
from big_pretrain.registry import Registry

OBJECTIVES = Registry('objective', [
    mae.MAE,
    wsp.WSP,
    flip.FLIP,
    lit.LiT,
    aim.AIM,
    finetune.Finetune,
    self_training.SelfTrainingStudent,
])


def objective_names() -> list[str]:
  return OBJECTIVES.names()


def objective_class(name: str):
  return OBJECTIVES[name]


def objectives_offering(capability: Capability) -> list[str]:
  """The objectives that declare `capability` (objective.CAPABILITIES), by name."""
  return [objective.name for objective in OBJECTIVES if capability in objective.offers]


def objective_defaults(name: str):
  """config.objective of `name` with every key at its default."""
  return objective_class(name).config_keys.defaults()


def build_objective(config):
  """The Objective for a (validated) stage config."""
  return OBJECTIVES[config.objective.name](config)


__all__ = ['CAPABILITIES', 'Capability', 'OBJECTIVES', 'build_objective', 'objective_class',
           'objective_defaults', 'objective_names', 'objectives_offering']
