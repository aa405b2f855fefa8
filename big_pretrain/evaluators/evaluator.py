"""What an evaluator is: built from its config, run on the current parameters."""

from __future__ import annotations

import abc
import dataclasses

import numpy as np


@dataclasses.dataclass
class EvalResult:
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (H, W, 3) in [0, 1]


class Evaluator(abc.ABC):

  def __init__(self, name, eval_config, stage_config, objective, trainer, workdir):
    self.name = name
    self.eval_config = eval_config
    self.stage_config = stage_config
    self.objective = objective
    self.trainer = trainer
    self.workdir = workdir

  @classmethod
  def check_config(cls, eval_config, path: str) -> None:
    """Evaluator-specific config checks, run before any compute (raise ConfigError).

    `eval_config` holds every key (defaults filled in); `path` names it in errors
    ('config.stages.mae.evals.low_shot'). Nothing to check by default.
    """

  @property
  def every_steps(self) -> int:
    return self.eval_config.every_steps

  def due(self, step: int, final: bool) -> bool:
    return final or (self.every_steps > 0 and step % self.every_steps == 0)

  @abc.abstractmethod
  def run(self, params, step: int) -> EvalResult:
    """Evaluates `params` (sharded, as in the train state)."""
