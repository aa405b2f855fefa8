"""The one training loop, shared by every objective and every stage.

Reads top to bottom: config -> mesh -> objective and optimiser -> sharded
state -> input -> restore or init -> writers and evaluators -> steps. It
contains nothing specific to any objective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from big_pretrain import sharding as sharding_lib
from big_pretrain.checkpoint import Checkpointer
from big_pretrain.config_schema import validate_stage_config
from big_pretrain.data.pipeline import InputPipeline
from big_pretrain.data.tokenizer import record_tokenizer
from big_pretrain.evaluators import build_evaluators
from big_pretrain.objectives import build_objective
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.step import build_trainer


@dataclasses.dataclass
class StageResult:
  state: object                   # the final TrainState (sharded)
  steps_run: int                  # steps taken by this call (0 if already finished)
  finished: bool                  # reached config.total_steps
  last_metrics: dict              # the training metrics of the last log interval
  eval_results: dict              # evaluator name -> scalars of its last run
  history: list                   # (step, metrics) of every log interval of this call


def train_stage(config, workdir: str, *, devices=None, stop_after_steps: int | None = None,
                initialise: Callable[[dict], dict] | None = None) -> StageResult:
  """Trains one stage in `workdir`, resuming from its latest checkpoint if any.

  `stop_after_steps` stops early (after saving a checkpoint), as a preempted
  run would; the same call without it resumes exactly. `initialise` maps fresh
  parameters to the starting ones (e.g. an MAE encoder); it is used only when
  the stage has no checkpoint of its own yet.
  """
  # --- Config: validated before anything is computed.
  validate_stage_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  # The checkpoints' text embeddings index this tokenizer's ids: keep it beside them.
  record_tokenizer(config.data, workdir)

  # --- Mesh and sharding rules.
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  logging.info('Mesh %s over %d devices.', dict(mesh.shape), mesh.size)

  # --- Objective, optimiser, the sharded step.
  objective = build_objective(config)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  tx = make_optimizer(config.optim, schedule)
  trainer = build_trainer(objective, tx, schedule, mesh, rules)

  # --- Input.
  data = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                       train=True, seed=config.seed)

  # --- Restore or initialise.
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  start_step = checkpointer.latest_step()
  if start_step is not None:
    state = checkpointer.restore(start_step, trainer.abstract_state, data.grain_iterator)
    if start_step >= config.total_steps:
      logging.info('This stage finished at step %d: nothing to do (a new --workdir starts '
                   'afresh).', start_step)
    else:
      logging.info('Resuming at step %d of %d.', start_step, config.total_steps)
  else:
    state = trainer.init_state(init_rng)
    if initialise is not None:
      state = state.replace(params=initialise(state.params))
    start_step = 0
  logging.info('Parameters:\n%s', sharding_lib.describe_param_shardings(state.params))

  # --- Writers, progress, evaluators.
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer,
      every_steps=config.log.every_steps)
  evaluators = build_evaluators(config, objective, trainer, workdir)
  eval_results = {}

  # --- Steps.
  pending_metrics, last_metrics, history = [], {}, []
  interval_start = time.perf_counter()
  step = start_step
  while step < config.total_steps:
    batch = next(data)
    state, metrics = trainer.train_step(state, batch, step_rng)
    step += 1
    pending_metrics.append(metrics)  # fetched at log time: no host sync per step
    progress(step)
    final = step == config.total_steps
    stopping = stop_after_steps is not None and step - start_step >= stop_after_steps
    if step % config.log.every_steps == 0 or final or stopping:
      last_metrics = _mean_metrics(jax.device_get(pending_metrics))
      elapsed = time.perf_counter() - interval_start
      interval_steps = len(pending_metrics)
      last_metrics['images_per_sec'] = interval_steps * config.batch_size / elapsed
      last_metrics['steps_per_sec'] = interval_steps / elapsed
      last_metrics['data/corrupt_images_skipped'] = data.corrupt_images_skipped
      writer.write_scalars(step, last_metrics)
      history.append((step, last_metrics))
      pending_metrics, interval_start = [], time.perf_counter()
    for evaluator in evaluators:
      if evaluator.due(step, final):
        result = evaluator.run(state.params, step)
        eval_results[evaluator.name] = result.scalars
        if result.scalars:
          writer.write_scalars(step, {f'eval/{evaluator.name}/{k}': v
                                      for k, v in result.scalars.items()})
        if result.images:
          writer.write_images(step, {k: v[None] for k, v in result.images.items()})
    checkpointer.save(step, state, data.grain_iterator, force=final or stopping)
    if stopping:
      break

  checkpointer.wait_until_finished()
  checkpointer.close()
  writer.flush()
  if eval_results and jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval_results.json'), 'w') as f:
      json.dump({'step': step, **eval_results}, f, indent=2)
  return StageResult(state, step - start_step, step >= config.total_steps, last_metrics,
                     eval_results, history)


def _mean_metrics(metrics_list: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in metrics_list])) for k in metrics_list[0]}
