"""The one training loop, shared by every objective and every stage.

`train_stage` reads top to bottom: config -> mesh -> objective, optimizer and the sharded
step -> input -> restore or initialize -> writer and evaluators -> steps. It contains
nothing specific to any objective; what it leans on has a name of its own:

  faults.py       when to stop (StopPolicy: the last step, a preemption notice, an early
                  stop) and the NaN check run before every save
  throughput.py   each log interval's metrics, images/s and MFU
  evaluation.py   which evaluators run when, and their recorded scores
  storage/        the stage's folder (StageDir) and the config its checkpoints were
                  trained with (resume_identity)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.data.device_prefetch import DevicePrefetch
from big_pretrain.data.text.tokenizer_files import record_tokenizer
from big_pretrain.data.train_input import InputPipeline
from big_pretrain.evaluators import build_evaluators
from big_pretrain.models import attention as attention_lib
from big_pretrain.models.vit import SCAN_AUTO
from big_pretrain.objectives import build_objective, objective_class
from big_pretrain.storage import resume_identity
from big_pretrain.storage import stage_dir as stage_dir_lib
from big_pretrain.storage import checkpoints
from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import Checkpointer, saved_steps
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train import faults
from big_pretrain.train import goodput
from big_pretrain.train.evaluation import StageEvaluations
from big_pretrain.train.metric_writer import MetricWriter
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.remat_choice import build_with_remat_choice
from big_pretrain.train.step import abstract_params
from big_pretrain.train.throughput import LogInterval, SpeedReference


# config.log.example_keys: each process's batches' example keys, in the stage's folder.
EXAMPLE_KEYS_FOLDER = 'example_keys'


@dataclasses.dataclass
class StageResult:
  state: object                   # the final TrainState (sharded)
  steps_run: int                  # steps taken by this call (0 if already finished)
  finished: bool                  # reached config.total_steps
  last_metrics: dict              # the training metrics of the last log interval
  eval_results: dict              # evaluator name -> scalars of its last run
  history: list                   # (step, metrics) of every log interval of this call
  preempted: bool = False         # stopped by a preemption notice (SIGTERM, SIGINT), after saving
  accounted_until: float = 0.0    # time.time() where this start's goodput record ends


# Each attention stack's kernel and padding (attention.plan_attention) is logged once per stage.
@attention_lib.choices_logged_per_stage()
def train_stage(config, workdir: str, *, devices=None, stop_after_steps: int | None = None,
                initialize: Callable[[dict], dict] | None = None,
                accounted_since: float | None = None) -> StageResult:
  """Trains one stage in `workdir`, resuming from its latest checkpoint if any.

  `config`: a stage config that config.validation accepts (stages.chain.run validates every
  stage before the first starts). `stop_after_steps` stops early (after saving a
  checkpoint), as a preempted run would; the same call without it resumes exactly.
  `initialize` maps fresh parameters to the starting ones (e.g. an MAE encoder), replacing
  the subtrees it takes and returning the others as given; it is used only when the stage
  has no checkpoint of its own yet, and is given the parameters' shapes and shardings
  (ShapeDtypeStructs), before the step compiles. `accounted_since`: time.time() where
  the goodput accounting before this start ended (the process's start, or the previous
  stage's end: stages.chain passes it); default now.
  """
  stage_dir = StageDir(workdir)
  clock = goodput.StageClock(stage_dir.file(goodput.GOODPUT_FILE),
                             write=jax.process_index() == 0, started_at=accounted_since)
  with clock.recording():  # every second, and at the end however it ends
    result = _train_stage(config, stage_dir, clock, devices=devices,
                          stop_after_steps=stop_after_steps, initialize=initialize)
  result.accounted_until = clock.accounted_until
  return result


def _train_stage(config, stage_dir: StageDir, clock: goodput.StageClock, *, devices,
                 stop_after_steps: int | None,
                 initialize: Callable[[dict], dict] | None) -> StageResult:
  """train_stage's work, accounted by `clock`."""
  workdir = stage_dir.path
  # --- Config: what the data decides filled in, compared with the one the checkpoints were
  # trained with before anything is written (it is recorded once the run goes ahead).
  checkpoint_steps = saved_steps(stage_dir.checkpoints)
  layout_asked_auto = config.model.scan == SCAN_AUTO
  config = objective_class(config.objective.name).resolve_config(config)
  config = resume_identity.with_recorded_layout(config, layout_asked_auto, workdir,
                                                checkpoint_steps)
  config_changes = resume_identity.check_resume(config, workdir, checkpoint_steps)
  clock.start_records()  # the run goes ahead: a refused one above has written nothing
  requested_config = config  # recorded as asked for (model.remat='auto' before it is chosen)
  record_tokenizer(config.data, workdir)  # the text embeddings index its ids: keep it beside

  # --- Mesh, objective, optimizer and the sharded step (model.remat='auto' is chosen here,
  # by compiling the step for the batches to come).
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  logging.info('Mesh %s over %d devices.', dict(mesh.shape), mesh.size)
  # Starting parameters (init_from, for a stage without checkpoints) are read and checked
  # before anything compiles: a weights file of another format or shape, damaged bytes or
  # non-finite values are named in seconds, not after the compile.
  with clock.measure('checkpoint_restore'):
    started_from = (_starting_params(initialize, config, mesh, rules)
                    if initialize is not None and not checkpoint_steps else None)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  with clock.measure('compile'):
    built = build_with_remat_choice(
        config, mesh, rules, make_optimizer(config.optim, schedule), schedule,
        global_batch_shapes(config.data, config.batch_size),
        may_unroll=layout_asked_auto and not checkpoint_steps)
  config, objective, trainer = built.config, built.objective, built.trainer
  if config.model.scan != requested_config.model.scan:  # unrolled to fit: the layout recorded
    requested_config = requested_config.copy_and_resolve_references()
    with requested_config.ignore_type():
      requested_config.model.scan = config.model.scan
    if started_from is not None:  # read again, in the layout chosen
      with clock.measure('checkpoint_restore'):
        started_from = _starting_params(initialize, config, mesh, rules)
  speed = SpeedReference.of(config, mesh)
  logging.info('Model FLOPs per step: %.3g; %s.', speed.flops_per_step, speed.peak_description)

  # Closed on every way out (also an error or a SIGTERM before the first step): the
  # last checkpoint is whole, then the checkpointer, the prefetch thread and the writer stop.
  with contextlib.ExitStack() as open_resources:
    # --- Input.
    data = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                         seed=config.seed,
                         example_keys_file=_example_keys_file(config, stage_dir))
    open_resources.callback(data.close)
    batches, data_position = _training_batches(data, config.data.device_prefetch)
    if batches is not data:
      open_resources.callback(batches.close)

    # --- Restore or initialize.
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    checkpointer = Checkpointer(stage_dir.checkpoints, config.checkpoint)
    open_resources.callback(checkpointer.close)
    # An asynchronous save completes: the blocking part of the last save.
    open_resources.callback(clock.measure('checkpoint_save')(checkpointer.wait_until_finished))
    # Initializing compiles the initializer; restoring reads the checkpoint.
    with clock.measure('checkpoint_restore' if checkpoint_steps else 'compile'):
      start_step, state = _restore_or_initialize(checkpointer, trainer, data_position,
                                                 init_rng, started_from, config.total_steps)
    final_evaluations_missing = (start_step >= config.total_steps
                                 and _final_evaluations_missing(config, stage_dir, start_step))
    if jax.process_index() == 0:
      resume_identity.record_start(requested_config, workdir, start_step, config_changes,
                                   topology=checkpoints.topology(state),
                                   topology_change=checkpointer.topology_change)
    logging.info('Parameters:\n%s', sharding_lib.describe_param_shardings(
        state.params, state.opt_state))

    # --- Writer and evaluators.
    writer = MetricWriter(workdir, write_events=jax.process_index() == 0)
    open_resources.callback(writer.close)
    writer.write_hparams(config.to_dict())
    evaluations = StageEvaluations(build_evaluators(config, objective, trainer, workdir), writer,
                                   stage_dir)
    if start_step == 0:
      with clock.measure('evaluation'):
        evaluations.at_start(state.params)

    # --- Steps.
    interval = LogInterval(speed, config.batch_size, config.total_steps)
    last_metrics, history, step, end = {}, [], start_step, None
    clock.steps_begin(start_step)
    open_resources.callback(lambda: logging.info('%s: %s.', workdir, goodput.format_line(
        clock.table())))
    with faults.PreemptionNotice() as preemption:
      try:
        stop = faults.StopPolicy(config.total_steps, start_step, stop_after_steps, preemption)
        if final_evaluations_missing:
          with clock.measure('evaluation'):
            evaluations.run_final(state, step)
        while step < config.total_steps:
          waiting_since = time.perf_counter()
          batch = next(batches)
          clock.waited_for_input(time.perf_counter() - waiting_since,
                                 device_busy=step > start_step and not _is_ready(metrics))
          if step == start_step:  # the first step of a start compiles it (or reads the cache)
            with clock.measure('compile'):
              state, metrics = trainer.train_step(state, batch, step_rng)
              jax.block_until_ready(metrics)
          else:
            state, metrics = trainer.train_step(state, batch, step_rng)
          step += 1
          clock.step_done(step)
          interval.add(metrics)
          end = stop.after(step)
          saving = end.final or end.stopping or checkpointer.should_save(step)
          logging_now = step % config.log.every_steps == 0 or end.final or end.stopping
          if logging_now:
            faults.stop_if_nonfinite(interval.fetch(), step, config.optim.skip_nonfinite_updates,
                                     checkpointer)
            last_metrics = interval.summarise(step)
            (last_metrics['data/corrupt_images_skipped'],
             last_metrics['data/corrupt_records_skipped']) = data.skipped_in_every_process()
            writer.write_scalars(step, last_metrics)
            writer.write_scalars(step, clock.scalars())
            history.append((step, last_metrics))
          elif saving:  # a NaN state is never written over a good one
            faults.stop_if_nonfinite(interval.pending, step, config.optim.skip_nonfinite_updates,
                                     checkpointer)
          # The checkpoint first: an evaluator that fails (or a kill while it runs) loses no
          # training, and a rerun of a finished stage runs only its final evaluations.
          if saving:
            with clock.measure('checkpoint_save'):
              checkpointer.save(step, state, data_position, force=True)
            clock.saved(step)
          if logging_now or saving:  # once a step, after its save (and every second anyway)
            clock.record()
          if not end.preempted:  # a preempted run has seconds left: evaluations wait
            with clock.measure('evaluation'):
              evaluations.run_due(state, step, final=end.final)
          if end.stopping:
            break
      finally:  # inside the notice: its handlers stay until the last checkpoint is whole
        open_resources.close()
  preempted = end is not None and end.preempted
  if preempted:
    logging.warning('Preemption notice (SIGTERM or Ctrl-C): saved a checkpoint at step %d and '
                    'stopped. Run the same command to resume from it.', step)
  return StageResult(state, step - start_step, step >= config.total_steps, last_metrics,
                     evaluations.results, history, preempted)


def _is_ready(tree) -> bool:
  """Whether the computation that produces `tree`'s arrays has finished (no waiting)."""
  return all(leaf.is_ready() for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'is_ready'))


def _training_batches(data: InputPipeline, device_prefetch: int):
  """The steps' batches, and the input position their checkpoints save: `device_prefetch`
  batches made and copied to the devices ahead, in a thread; 0: made in the loop."""
  if device_prefetch:
    batches = DevicePrefetch(data.local_batches, data.to_global_arrays, device_prefetch)
    return batches, batches.position
  return data, data.local_batches


def _example_keys_file(config, stage_dir: StageDir) -> str | None:
  """Where this process appends its batches' example keys (config.log.example_keys), or
  None. A local or mounted folder: objects in a bucket cannot be appended to."""
  if not config.log.example_keys:
    return None
  folder = stage_dir.file(EXAMPLE_KEYS_FOLDER)
  if storage.is_bucket(folder):
    logging.warning('config.log.example_keys: %s is in a bucket, where files cannot be '
                    'appended to; no example keys are written.', folder)
    return None
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f'process_{jax.process_index()}-of-{jax.process_count()}.jsonl')


def _starting_params(initialize: Callable[[dict], dict], config, mesh, rules) -> dict:
  """The subtrees of params that `initialize` replaces (read, checked and placed on their
  shardings), given the parameters' shapes only: nothing is compiled or allocated but them."""
  shapes = abstract_params(build_objective(config), mesh, rules)
  started = initialize(shapes)
  return {name: subtree for name, subtree in started.items() if subtree is not shapes.get(name)}


def _restore_or_initialize(checkpointer: Checkpointer, trainer, data_position, init_rng,
                           started_from: dict | None, total_steps: int) -> tuple[int, object]:
  """(step, state) of the latest readable checkpoint, or step 0 and a fresh state (with the
  subtrees `started_from` holds, read from init_from)."""
  restored = checkpointer.restore_latest_readable(trainer.abstract_state, data_position)
  if restored is not None:
    if restored[0] < total_steps:
      logging.info('Resuming at step %d of %d.', restored[0], total_steps)
    return restored
  state = trainer.init_state(init_rng)
  if started_from:
    state = state.replace(params={**state.params, **started_from})
  logging.info('No checkpoint in %s; starting at step 0.', checkpointer.directory)
  return 0, state


def _final_evaluations_missing(config, stage_dir: StageDir, final_step: int) -> bool:
  """Whether a stage that finished training still owes its final evaluations; every process
  follows process 0's view of the folder (or some would wait in an evaluator's collectives)."""
  recorded = stage_dir_lib.final_evaluations_recorded(stage_dir, bool(config.evals), final_step)
  missing = not int(multihost_utils.broadcast_one_to_all(np.int32(recorded)))
  if missing:
    logging.info('This stage finished training at step %d, but its final evaluations did not '
                 'complete: running them now.', final_step)
  else:
    logging.info('This stage finished at step %d: nothing to do (a new --workdir starts '
                 'afresh).', final_step)
  return missing

