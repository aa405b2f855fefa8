"""Runs a config: one stage, or `config.stages` in order, chained through checkpoints.

Each stage trains in its own subfolder of the workdir. A finished stage is
skipped, an interrupted one resumes from its last checkpoint, and a stage
with `init_from.stage` starts from that earlier stage's final checkpoint
(only the `init_from.take` subtrees; the rest fresh). The same command run
again after a crash or preemption therefore carries on where it stopped.

A stage may also be a job (`config.job`, stages/jobs.py), which runs a trained
model over data instead of training one: the pseudo-label job of self-training
labels images with an earlier stage as its teacher, and a later student stage
mixes them into its batches. A key that names an earlier stage (declared with
`names_stage`) is checked by chain_validation.py; where the stage runs from that
stage's folder, the chain fills it in (`with_stage_folders`).
"""

from __future__ import annotations

import os

from absl import logging

from big_pretrain.errors import Preempted
from big_pretrain.models.vit import SCAN_AUTO
from big_pretrain.objectives import objective_class
from big_pretrain.stages import jobs
from big_pretrain.stages import trained_stage
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.stages.chain_validation import stage_references, validate_config
from big_pretrain.storage import resume_identity
from big_pretrain.storage import files as storage
from big_pretrain.storage import stage_dir as stage_dir_lib
from big_pretrain.storage.checkpoints import saved_steps, unreadable_reason
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train import goodput
from big_pretrain.train.loop import train_stage


def stage_workdirs(config, workdir: str) -> dict[str, str]:
  """Stage name -> its folder; a single-stage config trains in `workdir` itself."""
  if 'stages' not in config:
    return {'main': workdir}
  return {name: os.path.join(workdir, name) for name in config.stages}


def _stage_configs(config) -> dict:
  return {'main': config} if 'stages' not in config else dict(config.stages.items())


def _stage_finished(stage_config, stage_dir: str) -> bool:
  """Whether the stage's final checkpoint is there and readable (its metadata, cheaply)."""
  if jobs.is_job(stage_config):
    return False  # a job checks its settings, then finds it has nothing to do
  checkpoint_dir = StageDir(stage_dir).checkpoints
  steps = saved_steps(checkpoint_dir)
  if not steps or steps[-1] < stage_config.total_steps:
    return False
  reason = unreadable_reason(os.path.join(checkpoint_dir, str(steps[-1])))
  if reason is not None:
    # train_stage sets it aside and resumes from the latest readable checkpoint.
    logging.warning('Stage %s reached its last step, but its final checkpoint cannot be read '
                    '(%s): running the stage again from its latest readable checkpoint.',
                    stage_dir, reason)
    return False
  # The final evaluations run after the final checkpoint is saved: a stage stopped
  # between the two is not finished, and train_stage runs only those evaluations.
  return stage_dir_lib.final_evaluations_recorded(StageDir(stage_dir), bool(stage_config.evals),
                                                  steps[-1])


def _check_same_run(stage_config, stage_dir: str) -> None:
  """Refuses (ConfigError, with the diff) a config other than the one the finished stage in
  `stage_dir` was trained with: its folder's name alone does not make it this run."""
  steps = saved_steps(StageDir(stage_dir).checkpoints)
  resolved = objective_class(stage_config.objective.name).resolve_config(stage_config)
  resolved = resume_identity.with_recorded_layout(
      resolved, stage_config.model.scan == SCAN_AUTO, stage_dir, steps)
  resume_identity.check_resume(resolved, stage_dir, steps, finished=True)


def initializer_from(init_from, workdir: str):
  """params -> params with the taken subtrees from the source checkpoint, or None."""
  if not (init_from.stage or init_from.checkpoint):
    return None
  source = (StageDir(os.path.join(workdir, init_from.stage)).checkpoints if init_from.stage
            else init_from.checkpoint)
  take = tuple(init_from.take)

  def initialize(params):
    # Resolved only when the stage starts fresh: a resumed stage never reads it.
    return init_from_lib.load_from(params, source, take)

  return initialize


def run(config, workdir: str, *, devices=None) -> dict[str, dict]:
  """Validates `config` (every stage, before the first starts), then `run_validated`."""
  validate_config(config)
  return run_validated(config, workdir, devices=devices)


def run_validated(config, workdir: str, *, devices=None,
                  accounted_since: float | None = None) -> dict[str, dict]:
  """Trains every unfinished stage of a validated config in order; returns {stage: evaluator
  results}. (main.py validates before it starts any device or process, then calls this.)

  `devices`: those every stage's mesh is laid over (default: all of them).
  `accounted_since`: time.time() from which the first stage trained accounts its goodput
  (main.py: when the process started); each next stage's continues where it ended.
  Raises errors.Preempted when a stage saved and stopped on a preemption notice.
  """
  stage_dirs = stage_workdirs(config, workdir)
  # Each stage's recorded config.json holds what its version wrote, before any stage starts.
  for name, stage_config in _stage_configs(config).items():
    if not jobs.is_job(stage_config):
      trained_stage.check_recorded_config(stage_dirs[name])
  for name, stage_config in _stage_configs(config).items():
    stage_dir = stage_dirs[name]
    stage_config = with_stage_folders(stage_config, stage_dirs)
    if _stage_finished(stage_config, stage_dir):
      _check_same_run(stage_config, stage_dir)
      logging.info('Stage %r finished earlier (%s): skipping it.', name, stage_dir)
      continue
    if jobs.is_job(stage_config):
      logging.info('Stage %r: job %r in %s.', name, stage_config.job, stage_dir)
      jobs.job_module(stage_config.job).run(stage_config, stage_dir, devices=devices)
      accounted_since = None  # a job's time is its own, not the next stage's start-up
      continue
    logging.info('Stage %r: training in %s.', name, stage_dir)
    result = train_stage(stage_config, stage_dir, devices=devices,
                         initialize=initializer_from(stage_config.init_from, workdir),
                         accounted_since=accounted_since)
    accounted_since = result.accounted_until
    if not result.finished:
      logging.info('Stage %r stopped at step %d; run the same command to resume.',
                   name, result.state.step)
      if result.preempted:
        raise Preempted(
            f'Stage {name!r} saved a checkpoint at step {int(result.state.step)} in '
            f'{stage_dir} on a preemption notice (SIGTERM or Ctrl-C) and stopped; run the '
            'same command to resume.')
      break
  results = collect_eval_results(config, stage_dirs)
  print(format_eval_results(results))
  print(format_goodput(stage_dirs))
  return results


def format_goodput(stage_dirs: dict[str, str]) -> str:
  """A line per trained stage: its goodput over every start, and its largest badput
  (`python -m big_pretrain.goodput WORKDIR` has the table)."""
  lines = []
  for name, stage_dir in stage_dirs.items():
    starts = goodput.read_starts(StageDir(stage_dir).file(goodput.GOODPUT_FILE))
    if starts:
      lines.append(f'{name:<14} {goodput.format_line(goodput.account(starts))}')
  return '\n'.join(['', *lines]) if lines else ''


def with_stage_folders(stage_config, stage_dirs: dict[str, str]):
  """The stage's config with each key that names an earlier stage and runs from its folder
  (declared with `chain_fills_path`: a student's data.pseudo_labels.stage, a job's
  teacher.stage) replaced by that folder in its path key."""
  filled = [(dotted, key, value) for dotted, key, value in stage_references(stage_config)
            if value and key.chain_fills_path]
  if not filled:
    return stage_config
  stage_config = stage_config.copy_and_resolve_references()
  for dotted, key, value in filled:
    group = stage_config
    *parents, leaf = dotted.split('.')
    for parent in parents:
      group = group[parent]
    group.update({leaf: None, key.path_key: stage_dirs[value]})
  return stage_config


def collect_eval_results(config, stage_dirs: dict[str, str]) -> dict[str, dict]:
  """{stage: evaluator results}; a job reports what it made (its module's `results`)."""
  results = {}
  stage_configs = _stage_configs(config)
  for name, stage_dir in stage_dirs.items():
    folder = StageDir(stage_dir)
    at_start = stage_dir_lib.read_results(
        folder.at_start_results_file,
        "The stage's starting scores are left out of this summary (TensorBoard has them).")
    if at_start is not None:
      results[f'{name} (start)'] = at_start
    if jobs.is_job(stage_configs[name]):
      stage_results = jobs.job_module(stage_configs[name].job).results(stage_dir)
    else:
      stage_results = stage_dir_lib.read_results(
          folder.eval_results_file, 'The same command evaluates the final checkpoint again.')
    if stage_results is not None:
      results[name] = _with_images_named(stage_results, folder)
  return results


def _with_images_named(stage_results: dict, folder: StageDir) -> dict:
  """An evaluator that scores nothing but draws an image (MAE's reconstruction) is listed
  with the image it wrote, {'image': path}."""
  named = dict(stage_results)
  for evaluator, scalars in stage_results.items():
    if evaluator != 'step' and not scalars and storage.exists(folder.evaluator_image(evaluator)):
      named[evaluator] = {'image': folder.evaluator_image(evaluator)}
  return named


def format_eval_results(results: dict[str, dict]) -> str:
  lines = ['', f'{"stage":<14} {"step":>7}  {"evaluator":<24} {"metric":<26} {"value":>8}']
  for stage, stage_results in results.items():
    step = stage_results.get('step', '')
    for evaluator, scalars in stage_results.items():
      if evaluator == 'step':
        continue
      for metric, value in scalars.items():
        shown = value if isinstance(value, str) else f'{value:>8.4f}'
        lines.append(f'{stage:<14} {step:>7}  {evaluator:<24} {metric:<26} {shown}')
  return '\n'.join(lines) if len(lines) > 2 else '(no evaluator results yet)'
