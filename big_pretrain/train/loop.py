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
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import Checkpointer, saved_steps
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data.device_prefetch import DevicePrefetch
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.data.train_input import InputPipeline
from big_pretrain.data.text.tokenizer import record_tokenizer
from big_pretrain.errors import FinalEvaluationError, NonFiniteLossError
from big_pretrain.evaluators import build_evaluators
from big_pretrain.models import attention as attention_lib
from big_pretrain.objectives import objective_class
from big_pretrain.train import faults
from big_pretrain.train import mfu as mfu_lib
from big_pretrain.train.metric_writer import MetricWriter
from big_pretrain.train import resume_identity
from big_pretrain.train.optim import ema_params, make_optimizer, make_schedule
from big_pretrain.train.remat_choice import build_with_remat_choice


# The `at_start` evaluators' scores of a stage's starting parameters (step 0).
AT_START_RESULTS_FILE = 'eval_results_at_start.json'
# The evaluators' latest scores, {'step': step, name: scalars}; written after the step's
# checkpoint. A stage is finished once its final checkpoint and its final scores exist.
EVAL_RESULTS_FILE = 'eval_results.json'


@dataclasses.dataclass
class StageResult:
  state: object                   # the final TrainState (sharded)
  steps_run: int                  # steps taken by this call (0 if already finished)
  finished: bool                  # reached config.total_steps
  last_metrics: dict              # the training metrics of the last log interval
  eval_results: dict              # evaluator name -> scalars of its last run
  history: list                   # (step, metrics) of every log interval of this call
  preempted: bool = False         # stopped by a preemption notice (SIGTERM, SIGINT), after saving


# Each attention stack's kernel and padding (attention.plan_attention) is logged once per stage.
@attention_lib.choices_logged_per_stage()
def train_stage(config, workdir: str, *, devices=None, stop_after_steps: int | None = None,
                initialise: Callable[[dict], dict] | None = None) -> StageResult:
  """Trains one stage in `workdir`, resuming from its latest checkpoint if any.

  `stop_after_steps` stops early (after saving a checkpoint), as a preempted
  run would; the same call without it resumes exactly. `initialise` maps fresh
  parameters to the starting ones (e.g. an MAE encoder); it is used only when
  the stage has no checkpoint of its own yet.
  """
  # --- Config: validated before anything is computed; what the data decides filled in.
  validate_stage_config(config)
  config = objective_class(config.objective.name).resolve_config(config)
  # The recorded config.json is compared with this one before anything is
  # written; it is replaced only once the run is known to go ahead (below).
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  config_changes = resume_identity.check_resume(config, workdir, saved_steps(checkpoint_dir))
  requested_config = config  # recorded as asked for (model.remat='auto' before it is chosen)
  # The checkpoints' text embeddings index this tokenizer's ids: keep it beside them.
  record_tokenizer(config.data, workdir)

  # --- Mesh and sharding rules.
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  logging.info('Mesh %s over %d devices.', dict(mesh.shape), mesh.size)

  # --- Objective, optimiser, the sharded step.
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  tx = make_optimizer(config.optim, schedule)
  # model.remat='auto' is chosen here by compiling the step for the batches to
  # come; from now on the stage's config names the policy chosen.
  built = build_with_remat_choice(config, mesh, rules, tx, schedule,
                                  global_batch_shapes(config.data, config.batch_size))
  config, objective, trainer = built.config, built.objective, built.trainer
  speed = _SpeedReference.of(config, mesh)
  logging.info('Model FLOPs per step: %.3g; %s.', speed.flops_per_step, speed.peak_description)

  # --- Input.
  data = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                       train=True, seed=config.seed)
  # The steps' batches, and the data position their checkpoints save.
  if config.data.device_prefetch:
    batches = DevicePrefetch(data.grain_iterator, data.to_global_arrays,
                             config.data.device_prefetch)
    data_position = batches.position
  else:
    batches, data_position = data, data.grain_iterator

  # --- Restore or initialise.
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  checkpointer = Checkpointer(checkpoint_dir, config.checkpoint)
  restored = checkpointer.restore_latest_readable(trainer.abstract_state, data_position)
  final_evaluations_missing = False
  if restored is not None:
    start_step, state = restored
    if start_step >= config.total_steps:
      # Every process must agree, or some would wait in an evaluator's collectives.
      final_evaluations_missing = not int(multihost_utils.broadcast_one_to_all(
          np.int32(final_evaluations_recorded(config, workdir, start_step))))
      if final_evaluations_missing:
        logging.info('This stage finished training at step %d, but its final evaluations '
                     'did not complete: running them now.', start_step)
      else:
        logging.info('This stage finished at step %d: nothing to do (a new --workdir starts '
                     'afresh).', start_step)
    else:
      logging.info('Resuming at step %d of %d.', start_step, config.total_steps)
  else:
    state = trainer.init_state(init_rng)
    if initialise is not None:
      state = state.replace(params=initialise(state.params))
    start_step = 0
    logging.info('No checkpoint in %s; starting at step 0.', checkpoint_dir)
  if jax.process_index() == 0:
    resume_identity.record_start(requested_config, workdir, start_step, config_changes)
  logging.info('Parameters:\n%s', sharding_lib.describe_param_shardings(
      state.params, state.opt_state))

  # --- Writers, progress, evaluators.
  writer = MetricWriter(workdir, write_events=jax.process_index() == 0)
  writer.write_hparams(config.to_dict())
  evaluators = build_evaluators(config, objective, trainer, workdir)
  eval_results = {}
  if start_step == 0:
    _evaluate_at_start(evaluators, state.params, writer, workdir)

  # --- Steps.
  pending_metrics, last_metrics, history = [], {}, []
  interval_start = time.perf_counter()
  step = start_step
  preempted = False
  max_skipped_in_a_row = config.optim.get('skip_nonfinite_updates', 0)
  try:
    with faults.PreemptionNotice() as preemption:
      if final_evaluations_missing:
        _evaluate(evaluators, state, step, eval_results, writer, workdir,
                  final_checkpoint=checkpointer.directory)
      while step < config.total_steps:
        batch = next(batches)
        state, metrics = trainer.train_step(state, batch, step_rng)
        step += 1
        pending_metrics.append(metrics)  # fetched at log and save time: no host sync per step
        final = step == config.total_steps
        preempted = preemption.reached(step)
        stopping = preempted or (stop_after_steps is not None
                                 and step - start_step >= stop_after_steps)
        saving = final or stopping or checkpointer.should_save(step)
        # Pending metrics are checked whenever they are fetched and before every
        # save: a NaN state is never written over a good one.
        if step % config.log.every_steps == 0 or final or stopping:
          fetched = jax.device_get(pending_metrics)
          _stop_if_nonfinite(fetched, step, max_skipped_in_a_row, checkpointer)
          last_metrics = _mean_metrics(fetched)
          elapsed = time.perf_counter() - interval_start
          last_metrics['images_per_sec'] = len(fetched) * config.batch_size / elapsed
          last_metrics['steps_per_sec'] = len(fetched) / elapsed
          last_metrics.update(speed.metrics(seconds_per_step=elapsed / len(fetched)))
          last_metrics['data/corrupt_images_skipped'] = data.corrupt_images_skipped
          writer.write_scalars(step, last_metrics)
          logging.info('Step %d of %d: %s to go at %.3g steps/s.', step, config.total_steps,
                       _duration((config.total_steps - step) / last_metrics['steps_per_sec']),
                       last_metrics['steps_per_sec'])
          history.append((step, last_metrics))
          pending_metrics, interval_start = [], time.perf_counter()
        elif saving:
          _stop_if_nonfinite(pending_metrics, step, max_skipped_in_a_row, checkpointer)
        # The checkpoint first: an evaluator that fails (or a kill while it runs) loses
        # no training, and a rerun of a finished stage runs only its final evaluations.
        if saving:
          checkpointer.save(step, state, data_position, force=True)
        # A preempted run has seconds left: its evaluations wait (a rerun runs the final
        # ones if this was the last step).
        due = [] if preempted else [e for e in evaluators if e.due(step, final)]
        _evaluate(due, state, step, eval_results, writer, workdir,
                  final_checkpoint=checkpointer.directory if final else None)
        if stopping:
          break
  finally:
    # Also on errors: an asynchronous save in flight finishes, so the last
    # good checkpoint is whole.
    try:
      checkpointer.wait_until_finished()
    finally:  # even when that save failed
      checkpointer.close()
      if batches is not data:
        batches.close()
      writer.close()
  if preempted:
    logging.warning('Preemption notice (SIGTERM or Ctrl-C): saved a checkpoint at step %d and '
                    'stopped. Run the same command to resume from it.', step)
  return StageResult(state, step - start_step, step >= config.total_steps, last_metrics,
                     eval_results, history, preempted)


def final_evaluations_recorded(config, workdir: str, final_step: int) -> bool:
  """Whether EVAL_RESULTS_FILE holds the scores of the stage's checkpoint at `final_step`
  (always so for a stage without evaluators)."""
  if not config.get('evals'):
    return True
  recorded = storage.read_json(os.path.join(workdir, EVAL_RESULTS_FILE))
  return recorded is not None and recorded.get('step', -1) >= final_step


def _evaluate(evaluators, state, step: int, eval_results: dict, writer, workdir: str, *,
              final_checkpoint: str | None = None) -> None:
  """Runs `evaluators` on `state`, logs their scores and writes all of `eval_results` (updated
  in place) to EVAL_RESULTS_FILE. `final_checkpoint`: the folder holding the stage's final
  checkpoint, when this is the final step; a failure then says how to finish the stage."""
  for evaluator in evaluators:
    try:
      result = evaluator.run(state.params, step)
      if evaluator.eval_config.get('also_ema'):
        ema = evaluator.run(ema_params(state.opt_state, state.params), step)
        result.scalars.update({f'ema_{k}': v for k, v in ema.scalars.items()})
    except Exception as error:  # pylint: disable=broad-exception-caught
      if final_checkpoint is None:
        raise
      raise FinalEvaluationError(
          f'Evaluator {evaluator.name!r} failed at the final step {step}: '
          f'{type(error).__name__}: {error}. Training is done and the final checkpoint is '
          f'saved in {final_checkpoint}; fix the cause (config.evals.{evaluator.name}) and run '
          'the same command: it runs only the final evaluations.') from error
    eval_results[evaluator.name] = result.scalars
    if result.scalars:
      writer.write_scalars(step, {f'eval/{evaluator.name}/{k}': v
                                  for k, v in result.scalars.items()})
    if result.images:
      writer.write_images(step, {k: v[None] for k, v in result.images.items()})
  if evaluators and jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, EVAL_RESULTS_FILE),
                           json.dumps({'step': step, **eval_results}, indent=2))


def _evaluate_at_start(evaluators, params, writer, workdir: str) -> None:
  """Evaluators with `at_start` score the starting parameters, logged at step 0 and kept
  in AT_START_RESULTS_FILE: the baseline that the stage's final scores are read against."""
  results = {}
  for evaluator in evaluators:
    if evaluator.eval_config.get('at_start'):
      results[evaluator.name] = evaluator.run(params, 0).scalars
      writer.write_scalars(0, {f'eval/{evaluator.name}/{key}': value
                               for key, value in results[evaluator.name].items()})
  if results and jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, AT_START_RESULTS_FILE),
                           json.dumps({'step': 0, **results}, indent=2))


@dataclasses.dataclass(frozen=True)
class _SpeedReference:
  """What achieved FLOP/s are measured against: analytic model FLOPs and a peak."""
  flops_per_step: float
  peak_flops: float | None        # per device (per machine on CPU); None: unknown
  num_devices: int                # devices sharing flops_per_step (1 for a CPU machine)
  peak_description: str

  @classmethod
  def of(cls, config, mesh) -> _SpeedReference:
    device = mesh.devices.flat[0]
    flops = mfu_lib.model_flops_per_step(config)
    if device.platform == 'cpu':
      # Fake CPU devices share the cores: the machine is the unit, and its
      # peak is a matmul measured now, in this process (~0.2 s).
      peak = mfu_lib.measure_matmul_peak_flops(config.model.dtype, size=1024, repeats=3,
                                               device=device)
      return cls(flops, peak, 1, f'CPU matmul peak measured now: {peak / 1e9:.1f} GFLOP/s')
    peak = mfu_lib.peak_flops_per_device(device, config.model.dtype)
    return cls(flops, peak, mesh.size, mfu_lib.describe_peak(device, config.model.dtype))

  def metrics(self, seconds_per_step: float) -> dict[str, float]:
    achieved = mfu_lib.achieved_flops_per_device(self.flops_per_step, seconds_per_step,
                                                 self.num_devices)
    metrics = {'model_tflops_per_sec_per_device': achieved / 1e12}
    if self.peak_flops:
      metrics['mfu'] = achieved / self.peak_flops
    return metrics


def _stop_if_nonfinite(pending_metrics: list[dict], step: int, max_skipped_in_a_row: int,
                       checkpointer: Checkpointer) -> None:
  """Raises NonFiniteLossError naming the first step whose update was NaN or Inf."""
  first_step = step - len(pending_metrics) + 1
  found = faults.first_nonfinite_step(
      jax.device_get([{k: m[k] for k in m if k in _FINITE_CHECK_KEYS} for m in pending_metrics]),
      first_step, max_skipped_in_a_row)
  if found is None:
    return
  bad_step, metrics = found
  checkpointer.wait_until_finished()
  latest = checkpointer.latest_step()
  raise NonFiniteLossError(
      f'The loss became {float(metrics["loss"])} (gradient norm {float(metrics["grad_norm"])}) '
      f'at step {bad_step}: stopping. The last checkpoint, '
      + (f'step {latest} in {checkpointer.directory}, ' if latest is not None else 'none, ')
      + 'was written before it and is intact; nothing after it was saved. Lower '
      'config.optim.lr_per_256, set config.optim.clip_grad_norm, or let '
      'config.optim.skip_nonfinite_updates skip a few such steps, then run the same command '
      'to resume from that checkpoint.')


# The metrics that say whether a step's update was finite, and whether it was skipped.
_FINITE_CHECK_KEYS = ('loss', 'grad_norm', 'nonfinite_updates_in_a_row')


def _duration(seconds: float) -> str:
  """'1h 05m', '3m 20s', '12s'."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h {seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m {seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def _mean_metrics(metrics_list: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in metrics_list])) for k in metrics_list[0]}
