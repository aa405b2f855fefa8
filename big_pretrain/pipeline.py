"""Runs a config: a single stage now; ordered stages chain through checkpoints."""

from __future__ import annotations

from big_pretrain.train.loop import StageResult, train_stage


def run(config, workdir: str) -> StageResult:
  return train_stage(config, workdir)
