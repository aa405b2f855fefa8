"""The config under test as reliability/kill_resume.py sees it: its stages, what each stage's
checkpoint folder holds at a given moment, and the seeded schedule of kills over them."""

from __future__ import annotations

import dataclasses
import os
import random

from big_pretrain.storage.stage_dir import StageDir, final_evaluations_recorded
import re

from reliability.processes import REPO

# Orbax (0.12.8) saves step N into `N.orbax-checkpoint-tmp` and renames it to `N` when whole.
TMP_MARK = '.orbax-checkpoint-tmp'
_TMP_STEP = re.compile(r'^(?:.*?_)?(\d+)' + re.escape(TMP_MARK))
KINDS = ('training', 'checkpoint', 'between')


# --- The config: stage names, lengths and save intervals.


@dataclasses.dataclass
class Stage:
  name: str
  dir: str                  # relative to the run's workdir ('' for a single-stage config)
  total_steps: int
  save_every: int
  log_every: int
  has_evaluators: bool = False  # its final evaluations run after its final checkpoint
  batch_size: int = 0       # global batch: the columns of its example keys


def config_spec_path(spec: str) -> str:
  """The config spec with an absolute path, so main.py reads the same file from REPO."""
  path, sep, variant = spec.partition(':')
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return os.path.abspath(path) + sep + variant


def load_stages(spec: str, overrides: list[str]) -> list[Stage]:
  """Parses the config exactly as main.py does (same flag machinery, same overrides)."""
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  argv = ['kill_resume', f'--config={spec}', *overrides]
  # sys_argv: ml_collections reads the overrides from it (default: sys.argv, which holds
  # them only when they are this script's own arguments).
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config = values['config'].value
  stage_configs = dict(config.stages.items()) if 'stages' in config else {'main': config}
  return [Stage(name, name if 'stages' in config else '', c.total_steps, c.checkpoint.every_steps,
                c.log.every_steps, bool(c.evals), c.batch_size)
          for name, c in stage_configs.items()]


def stage_override(stage: Stage, key: str, value) -> str:
  """The command-line override of `key` in `stage`'s config: --config.stages.<name>.KEY=V in
  a chain, --config.KEY=V for a single-stage config."""
  return f'--config.{f"stages.{stage.name}." if stage.dir else ""}{key}={value}'


# --- The workdir as the kills see it.


def scan_checkpoints(run_dir: str, stage: Stage) -> tuple[list[int], list[str]]:
  """(finished steps, in-progress Orbax temporary folders) of one stage."""
  try:
    names = os.listdir(os.path.join(run_dir, stage.dir, 'checkpoints'))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def tmp_step(name: str) -> int | None:
  match = _TMP_STEP.match(name)
  return int(match.group(1)) if match else None


def describe_workdir(run_dir: str, stages: list[Stage]) -> str:
  parts = []
  for stage in stages:
    finished, in_progress = scan_checkpoints(run_dir, stage)
    text = f'{stage.name} ' + (','.join(map(str, finished[-3:])) if finished else '-')
    if in_progress:
      text += ' (in progress: ' + ', '.join(in_progress) + ')'
    parts.append(text)
  return '; '.join(parts)


def final_checkpoint_saved(run_dir: str, stage: Stage) -> bool:
  finished, _ = scan_checkpoints(run_dir, stage)
  return bool(finished) and finished[-1] >= stage.total_steps


def stage_is_finished(run_dir: str, stage: Stage) -> bool:
  """Its final checkpoint and the final evaluations that follow it (the chain skips it)."""
  return final_checkpoint_saved(run_dir, stage) and final_evaluations_recorded(
      StageDir(os.path.join(run_dir, stage.dir)), stage.has_evaluators, stage.total_steps)


# --- The kill schedule.


@dataclasses.dataclass
class Kill:
  kind: str                 # training | checkpoint | between
  stage: int                # index of the stage it is aimed at (between: the stage that ends)
  target: int = 0           # training: a logged step; checkpoint: a save's step (or later)
  delay: float = 0.0        # training: seconds after that step was logged
  variant: str = ''         # between: 'stage finished' or 'next stage log line'

  def plan(self, stages: list[Stage]) -> str:
    name = stages[self.stage].name
    if self.kind == 'training':
      return f'training    {name} step >= {self.target}, then {self.delay:.2f} s'
    if self.kind == 'checkpoint':
      return f'checkpoint  {name} save of step >= {self.target} in progress'
    return f'between     end of {name}: {self.variant}'


def _split(count: int, weights: list[int]) -> list[int]:
  """`count` split in proportion to `weights` (largest remainder)."""
  exact = [count * w / sum(weights) for w in weights]
  parts = [int(x) for x in exact]
  for i in sorted(range(len(weights)), key=lambda i: parts[i] - exact[i])[:count - sum(parts)]:
    parts[i] += 1
  return parts


def plan_kills(rng: random.Random, kills: int, stages: list[Stage]) -> list[Kill]:
  """The kills in the order they happen: stage by stage, by target step."""
  n_between = max(1, round(0.15 * kills)) if len(stages) > 1 else 0
  n_checkpoint = max(1, round(0.35 * kills))
  n_training = kills - n_between - n_checkpoint
  weights = [s.total_steps for s in stages]
  per_stage = list(zip(_split(n_training, weights), _split(n_checkpoint, weights)))
  between_at = _split(n_between, [1] * (len(stages) - 1)) if n_between else []
  schedule = []
  for i, stage in enumerate(stages):
    n_train, n_ckpt = per_stage[i]
    logged = list(range(stage.log_every, stage.total_steps, stage.log_every))
    trainings = (rng.sample(logged, n_train) if n_train <= len(logged)
                 else [rng.choice(logged) for _ in range(n_train)])
    # Saves: every interval and the last step; a later stage's first save (step 1)
    # too. The first stage's step-1 save would leave nothing to resume from.
    saves = sorted(set(range(stage.save_every, stage.total_steps + 1, stage.save_every))
                   | {stage.total_steps} | ({1} if i > 0 else set()))
    stage_kills = ([Kill('training', i, t, round(rng.uniform(0.0, 3.0), 2)) for t in trainings]
                   + [Kill('checkpoint', i, rng.choice(saves)) for _ in range(n_ckpt)])
    stage_kills.sort(key=lambda k: (k.target, k.kind != 'checkpoint'))
    schedule += stage_kills
    if i < len(between_at):
      for j in range(between_at[i]):
        # The first kill at a stage's end may land the moment it is finished; the
        # stage is then skipped on restart, so later ones land as the next starts.
        if j == 0:
          variant = ('stage finished' if between_at[i] > 1
                     else rng.choice(['stage finished', 'next stage log line']))
        else:
          variant = 'next stage log line'
        schedule.append(Kill('between', i, variant=variant))
  return schedule
