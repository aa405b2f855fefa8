"""Soak test: kill the MAE -> WSP chain at random moments, resume it, compare bit for bit.

Runs `python main.py --config=configs/mae_then_wsp.py:demo --workdir=DIR`,
kills its whole process group with SIGKILL at `--kills` moments drawn from a
seeded schedule, restarts the same command after each kill, lets the last
attempt finish, and compares the final checkpoints of every stage with those
of an uninterrupted run of the same command: every array of the train state
must be bit-identical, and so must the data iterator position and
eval_results.json.

The kills are of three kinds, all in every schedule:
  training      a random delay (0-3 s) after the attempt logged a planned step
  checkpoint    the moment an Orbax save is in progress, i.e. a
                `<step>.orbax-checkpoint-tmp` folder appears in
                DIR/<stage>/checkpoints (orbax-checkpoint 0.12.8 writes there and
                renames it to `<step>` when the save is whole)
  between       at the end of a stage: the moment its final checkpoint appears
                (the stage now counts as finished), or when the log says the next
                stage starts ("Stage 'wsp': training in")
No kill happens before the first stage has a finished checkpoint, so every
restart has something to resume from.

  python benchmarks/kill_resume.py                        # 20 kills, seed 0, ~11 min on 2 CPU cores
  python benchmarks/kill_resume.py --kills=5 --seed=1 --reference_workdir=/tmp/maws_demo
  python benchmarks/kill_resume.py --config.stages.mae.total_steps=400   # overrides go to both runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

# Run from anywhere: the configs/ package lives at the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# Orbax (0.12.8) saves step N into `N.orbax-checkpoint-tmp` and renames it to `N` when whole.
TMP_MARK = '.orbax-checkpoint-tmp'
_TMP_STEP = re.compile(r'^(?:.*?_)?(\d+)' + re.escape(TMP_MARK))

# What main.py logs (absl, to stderr).
_STAGE_START = re.compile(r"Stage '([^']+)': training in")
_STAGE_SKIP = re.compile(r"Stage '([^']+)' finished earlier")
_RESUMING = re.compile(r'Resuming at step (\d+) of (\d+)')
_STEP_LOGGED = re.compile(r'\] \[(\d+)\] ')  # the metric writer's console line: "[250] loss=..."
_INITIALISED = 'Initialised params/'
_CORRUPT = 'cannot be read'
_TMP_LEFTOVER = 'Removing existing directory since it is not finalized'
_TMP_RECREATED = re.compile(r'Attempted to create temporary directory (\S+) which already exists')
_DECIDED = 'Parameters:'  # loop.py logs it once the stage has restored or initialised its state

POLL_SECONDS = 0.005
KINDS = ('training', 'checkpoint', 'between')


def parse_args():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      epilog='Any --config.KEY=VALUE override is passed to both the killed and the reference run.')
  parser.add_argument('--workdir', default=None,
                      help='a new or empty folder; default: a fresh temporary folder')
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0, help='seeds the kill schedule')
  parser.add_argument('--reference_workdir', default=None,
                      help='an existing uninterrupted run of the same config and overrides '
                           '(default: run one in WORKDIR/reference)')
  parser.add_argument('--config', default='configs/mae_then_wsp.py:demo')
  parser.add_argument('--attempt_timeout', type=float, default=900,
                      help='seconds one attempt may run before it is stopped as hung')
  args, extra = parser.parse_known_args()
  bad = [arg for arg in extra if not arg.startswith('--config.')]
  if bad:
    parser.error(f'unknown arguments {bad}; only --config.KEY=VALUE overrides pass through.')
  if args.kills < 3:
    parser.error('--kills must be at least 3: one of each kind.')
  return args, extra


# --- The config: stage names, lengths and save intervals.


@dataclasses.dataclass
class Stage:
  name: str
  dir: str                  # relative to the run's workdir ('' for a single-stage config)
  total_steps: int
  save_every: int
  log_every: int


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
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True)
  values(['kill_resume', f'--config={spec}', *overrides])
  config = values['config'].value
  stage_configs = dict(config.stages.items()) if 'stages' in config else {'main': config}
  return [Stage(name, name if 'stages' in config else '', c.total_steps, c.checkpoint.every_steps,
                c.log.every_steps) for name, c in stage_configs.items()]


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


def stage_is_finished(run_dir: str, stage: Stage) -> bool:
  finished, _ = scan_checkpoints(run_dir, stage)
  return bool(finished) and finished[-1] >= stage.total_steps


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


# --- One attempt: main.py in its own process group, its output in a log file.


class Attempt:
  """`command` started in a new session, stdout and stderr into `log_path` (no pipes)."""

  def __init__(self, command: list[str], log_path: str):
    self.log_path = log_path
    self._log = open(log_path, 'wb')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
    self.start = time.monotonic()
    self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                 stdout=self._log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    self._reader = open(log_path, 'rb')
    self._partial = b''
    self.lines: list[str] = []
    self.current_stage: str | None = None
    self.started_stages: list[str] = []
    self.logged_step: dict[str, int] = {}
    self.recreated_tmp: set[str] = set()  # paths of leftover temporary folders Orbax replaced

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def read_log(self) -> None:
    """Takes in the lines written since the last call."""
    data = self._partial + self._reader.read()
    *complete, self._partial = data.split(b'\n')
    for raw in complete:
      line = raw.decode('utf-8', 'replace')
      self.lines.append(line)
      if match := _STAGE_START.search(line):
        self.current_stage = match.group(1)
        self.started_stages.append(self.current_stage)
      elif match := _TMP_RECREATED.search(line):
        self.recreated_tmp.add(os.path.normpath(match.group(1)))
      elif (match := _STEP_LOGGED.search(line)) and self.current_stage:
        self.logged_step[self.current_stage] = max(
            int(match.group(1)), self.logged_step.get(self.current_stage, 0))

  def kill(self) -> None:
    """SIGKILL to the whole process group: no child survives."""
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait(timeout=60)

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      self.read_log()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.kill()
    self.read_log()
    self._log.close()
    self._reader.close()

  def tail(self, n: int = 25) -> str:
    self.read_log()
    return '\n'.join(self.lines[-n:])


def main_command(config_spec: str, overrides: list[str], run_dir: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config_spec}',
          f'--workdir={run_dir}', *overrides]


class AttemptFailed(RuntimeError):
  pass


def run_until_kill(attempt: Attempt, kill: Kill, run_dir: str, stages: list[Stage],
                   timeout: float) -> dict:
  """Polls the attempt's log and checkpoint folders; SIGKILLs it when `kill` is due."""
  names = [s.name for s in stages]
  first = stages[0]
  finished_at_start = stage_is_finished(run_dir, stages[kill.stage])
  variant = kill.variant
  if kill.kind == 'between' and variant == 'stage finished' and finished_at_start:
    variant = 'next stage log line'  # already finished: it cannot happen again
  # Temporary folders left by an earlier kill are not this attempt's saves: they count
  # only once Orbax has replaced them (it logs that), when the attempt saves that step.
  leftovers = {os.path.normpath(os.path.join(run_dir, s.dir, 'checkpoints', name))
               for s in stages for name in scan_checkpoints(run_dir, s)[1]}
  fire_at = None
  trigger = ''
  while True:
    attempt.read_log()
    rc = attempt.proc.poll()
    if rc is not None:
      attempt.read_log()
      raise AttemptFailed(
          f'the attempt exited (code {rc}) before this kill was due'
          + (' (it finished the whole run)' if rc == 0 else '') + '.')
    if attempt.elapsed() > timeout:
      raise AttemptFailed(f'no kill moment within {timeout:.0f} s: stopped as hung.')
    now = time.monotonic()
    # Armed only once the first stage has a finished checkpoint: a restart must resume.
    if scan_checkpoints(run_dir, first)[0]:
      current = (names.index(attempt.current_stage) if attempt.current_stage in names else -1)
      if kill.kind == 'training' and fire_at is None and current >= kill.stage:
        step = attempt.logged_step.get(names[current])
        if step is not None and (current > kill.stage or step >= kill.target):
          fire_at = now + kill.delay
          trigger = f'{names[current]} logged step {step}, then {kill.delay:.2f} s'
      elif kill.kind == 'checkpoint' and current >= kill.stage:
        _, in_progress = scan_checkpoints(run_dir, stages[current])
        folder = os.path.join(run_dir, stages[current].dir, 'checkpoints')
        stale = leftovers - attempt.recreated_tmp
        fresh = [n for n in in_progress if os.path.normpath(os.path.join(folder, n)) not in stale]
        due = [n for n in fresh if current > kill.stage
               or (tmp_step(n) is not None and tmp_step(n) >= kill.target)]
        if due:
          fire_at, trigger = now, f'{names[current]}/checkpoints/{due[0]} appeared'
      elif kill.kind == 'between':
        if variant == 'stage finished' and stage_is_finished(run_dir, stages[kill.stage]):
          fire_at = now
          trigger = (f'{names[kill.stage]}/checkpoints/'
                     f'{scan_checkpoints(run_dir, stages[kill.stage])[0][-1]} appeared: '
                     f'{names[kill.stage]} finished')
        elif (variant == 'next stage log line'
              and names[kill.stage + 1] in attempt.started_stages):
          fire_at, trigger = now, f"log: Stage '{names[kill.stage + 1]}': training in"
    if fire_at is not None and now >= fire_at:
      seen = describe_workdir(run_dir, stages)
      at = attempt.elapsed()
      attempt.kill()
      attempt.read_log()
      return dict(at=at, trigger=trigger, seen=seen, after=describe_workdir(run_dir, stages),
                  logged={k: v for k, v in attempt.logged_step.items()}, variant=variant)
    time.sleep(POLL_SECONDS)


# --- What a restart did.


def restart_report(attempt: Attempt) -> dict:
  """What the attempt's log says each stage did: skipped, resumed at a step, started fresh."""
  attempt.read_log()
  skipped, resumed, fresh, undecided, initialised = [], [], [], [], []
  stage, decided = None, True
  for line in attempt.lines:
    if match := _STAGE_SKIP.search(line):
      skipped.append(match.group(1))
    elif match := _STAGE_START.search(line):
      if stage is not None and not decided:
        undecided.append(stage)
      stage, decided = match.group(1), False
    elif (match := _RESUMING.search(line)) and not decided:
      resumed.append((stage, int(match.group(1))))
      decided = True
    elif _INITIALISED in line:
      initialised.append(stage)
    elif _DECIDED in line and not decided:
      fresh.append(stage)
      decided = True
  if stage is not None and not decided:
    undecided.append(stage)  # killed before it restored or initialised anything
  return dict(
      skipped=skipped, resumed=resumed, fresh=fresh, undecided=undecided,
      initialised=initialised,
      corrupt=[line for line in attempt.lines if _CORRUPT in line],
      tmp_leftovers=[line for line in attempt.lines if _TMP_LEFTOVER in line],
  )


def is_resume(report: dict) -> bool:
  return bool(report['skipped'] or report['resumed'])


def expected_restart(run_dir: str, stages: list[Stage]) -> tuple[list[str], str, int | None]:
  """(stages to skip, stage to continue, its step or None for a fresh start) after a kill."""
  skipped = []
  for stage in stages:
    finished, _ = scan_checkpoints(run_dir, stage)
    if finished and finished[-1] >= stage.total_steps:
      skipped.append(stage.name)
      continue
    return skipped, stage.name, (finished[-1] if finished else None)
  return skipped, '', None


def describe_restart(report: dict) -> str:
  parts = [f'{s} skipped' for s in report['skipped']]
  parts += [f'{s} resumed at step {step}' for s, step in report['resumed']]
  parts += [f'{s} started fresh'
            + (' (from the previous stage)' if s in report['initialised'] else '')
            for s in report['fresh']]
  parts += [f'{s} killed before restoring' for s in report['undecided']]
  if report['corrupt']:
    parts.append(f'{len(report["corrupt"])} unreadable checkpoint(s) set aside')
  if report['tmp_leftovers']:
    parts.append(f'{len(report["tmp_leftovers"])} unfinished save folder(s) replaced by Orbax')
  return ', '.join(parts) or 'nothing logged yet'


# --- The comparison.


def final_step_dir(run_dir: str, stage: Stage) -> tuple[int | None, str | None]:
  finished, _ = scan_checkpoints(run_dir, stage)
  if not finished:
    return None, None
  return finished[-1], os.path.join(run_dir, stage.dir, 'checkpoints', str(finished[-1]))


def restore_arrays(step_dir: str) -> dict:
  """{path: numpy array} of the step's 'state' item, restored as saved (no target)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(os.path.join(step_dir, 'state'))
  finally:
    checkpointer.close()
  return {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def read_text_files(folder: str) -> dict[str, str]:
  if not os.path.isdir(folder):
    return {}
  return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
          if name.endswith('.json')}


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def compare_runs(reference_dir: str, killed_dir: str, stages: list[Stage]) -> tuple[list, bool]:
  import numpy as np
  rows, ok = [], True
  for stage in stages:
    ref_step, ref_path = final_step_dir(reference_dir, stage)
    run_step, run_path = final_step_dir(killed_dir, stage)
    row = dict(stage=stage.name, ref_step=ref_step, run_step=run_step, arrays=0, identical=0,
               max_diff=float('nan'), missing=[], data_equal=False, evals_equal=False)
    if ref_path and run_path:
      ref, run = restore_arrays(ref_path), restore_arrays(run_path)
      row['arrays'] = len(ref)
      row['missing'] = sorted(set(ref) ^ set(run))
      diffs = []
      for key in sorted(set(ref) & set(run)):
        a, b = ref[key], run[key]
        same = (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                and a.tobytes() == b.tobytes())
        row['identical'] += same
        if a.shape == b.shape and a.size and np.issubdtype(a.dtype, np.number):
          diffs.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        elif not same:
          diffs.append(float('inf'))
      row['max_diff'] = max(diffs) if diffs else 0.0
      row['data_equal'] = (read_text_files(os.path.join(ref_path, 'data'))
                           == read_text_files(os.path.join(run_path, 'data')) != {})
    ref_evals = read_json(os.path.join(reference_dir, stage.dir, 'eval_results.json'))
    run_evals = read_json(os.path.join(killed_dir, stage.dir, 'eval_results.json'))
    row['evals_equal'] = ref_evals is not None and ref_evals == run_evals
    row['evals_note'] = ('equal' if row['evals_equal'] else
                         'missing in killed run' if run_evals is None else
                         'missing in reference' if ref_evals is None else 'differ')
    row['ok'] = (ref_step is not None and ref_step == run_step == stage.total_steps
                 and row['arrays'] > 0 and row['identical'] == row['arrays']
                 and not row['missing'] and row['data_equal'] and row['evals_equal'])
    ok &= row['ok']
    rows.append(row)
  return rows, ok


def comparison_problems(row: dict, stages: list[Stage]) -> list[str]:
  total = next(s.total_steps for s in stages if s.name == row['stage'])
  problems = []
  if not (row['ref_step'] == row['run_step'] == total):
    problems.append(f'final steps {row["ref_step"]} / {row["run_step"]}, expected {total}')
  if row['identical'] != row['arrays'] or row['missing'] or not row['arrays']:
    problems.append(f'{row["arrays"] - row["identical"]} of {row["arrays"]} arrays differ '
                    f'(max abs diff {row["max_diff"]:.3g})')
  if not row['data_equal']:
    problems.append('data iterator positions differ')
  if not row['evals_equal']:
    problems.append(f'eval_results.json {row["evals_note"]}')
  return problems


def format_table(rows: list) -> str:
  lines = ['| stage | final step (ref / killed) | arrays | bit-identical | max abs diff '
           '| data iterator | eval_results.json |',
           '|-------|--------------------------:|-------:|--------------:|-------------:'
           '|---------------|-------------------|']
  for r in rows:
    lines.append(f'| {r["stage"]} | {r["ref_step"]} / {r["run_step"]} | {r["arrays"]} '
                 f'| {r["identical"]} | {r["max_diff"]:.3g} '
                 f'| {"equal" if r["data_equal"] else "DIFFERS"} | {r["evals_note"]} |')
  return '\n'.join(lines)


# --- The whole test.


def prepare_root(workdir: str | None) -> str:
  if workdir is None:
    return tempfile.mkdtemp(prefix='kill_resume_')
  if os.path.isdir(workdir) and os.listdir(workdir):
    sys.exit(f'--workdir={workdir} is not empty: the soak test needs a fresh folder.')
  os.makedirs(workdir, exist_ok=True)
  return os.path.abspath(workdir)


def run_reference(command: list[str], log_path: str, timeout: float) -> float:
  start = time.monotonic()
  attempt = Attempt(command, log_path)
  try:
    rc = attempt.wait(timeout)
  except subprocess.TimeoutExpired:
    sys.exit(f'The reference run took over {timeout:.0f} s; see {log_path}.')
  finally:
    attempt.close()
  if rc != 0:
    sys.exit(f'The reference run failed (exit code {rc}); see {log_path}:\n{attempt.tail()}')
  return time.monotonic() - start


def main():
  args, overrides = parse_args()
  config_spec = config_spec_path(args.config)
  stages = load_stages(config_spec, overrides)
  rng = random.Random(args.seed)
  schedule = plan_kills(rng, args.kills, stages)
  root = prepare_root(args.workdir)
  killed_dir = os.path.join(root, 'killed')
  log_dir = os.path.join(root, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  print(f'workdir: {root}  (killed run: {killed_dir}; logs: {log_dir})')
  print('command: ' + ' '.join(main_command(config_spec, overrides, killed_dir)))
  print('stages: ' + ', '.join(f'{s.name} ({s.total_steps} steps, saves every {s.save_every})'
                               for s in stages))
  print(f'\nKill schedule (seed {args.seed}):')
  for i, kill in enumerate(schedule, 1):
    print(f'  {i:>2}. {kill.plan(stages)}')
  sys.stdout.flush()

  wall_start = time.monotonic()
  if args.reference_workdir:
    reference_dir = os.path.abspath(args.reference_workdir)
    missing = [s.name for s in stages if not stage_is_finished(reference_dir, s)]
    if missing:
      sys.exit(f'--reference_workdir={reference_dir} has unfinished stages {missing}.')
    print(f'\nReference: reusing {reference_dir}')
  else:
    reference_dir = os.path.join(root, 'reference')
    print(f'\nReference: uninterrupted run in {reference_dir} ...', flush=True)
    seconds = run_reference(main_command(config_spec, overrides, reference_dir),
                            os.path.join(log_dir, 'reference.log'), 3 * args.attempt_timeout)
    print(f'Reference: finished in {seconds:.0f} s.')

  print(f'\nKilled run in {killed_dir}:', flush=True)
  killed_start = time.monotonic()
  command = main_command(config_spec, overrides, killed_dir)
  failures, kinds, resumes, corrupt, leftovers = [], [], 0, [], 0
  previous_kill, completed = None, False
  attempt = None
  try:
    for number in range(1, len(schedule) + 2):
      attempt = Attempt(command, os.path.join(log_dir, f'attempt_{number:02d}.log'))
      last = number > len(schedule)
      fatal = False
      try:
        if last:
          try:
            rc = attempt.wait(args.attempt_timeout)
          except subprocess.TimeoutExpired:
            raise AttemptFailed(f'the last attempt ran over {args.attempt_timeout:.0f} s.')
          if rc != 0:
            raise AttemptFailed(f'the last attempt exited with code {rc}.')
        else:
          kill = schedule[number - 1]
          event = run_until_kill(attempt, kill, killed_dir, stages, args.attempt_timeout)
      except AttemptFailed as error:
        fatal = True
        failures.append(f'attempt {number}: {error}\n    log {attempt.log_path}, last lines:\n'
                        + '\n'.join('      ' + l for l in attempt.tail().splitlines()))
        print(f'  attempt {number:>2}: FAILED: {error}', flush=True)
      if number > 1:
        report = restart_report(attempt)
        resumed = is_resume(report)
        resumes += resumed
        corrupt += report['corrupt']
        leftovers += len(report['tmp_leftovers'])
        skip, stage, step = previous_kill['expected']
        got_step = dict(report['resumed']).get(stage)
        as_expected = (set(skip) <= set(report['skipped'])
                       and (stage in report['undecided']  # killed before it got there
                            or (got_step == step if step is not None
                                else stage in report['fresh'])))
        note = '' if as_expected else (
            '  [UNEXPECTED: the workdir after the kill called for '
            + (f'{stage} resumed at step {step}' if step is not None else f'{stage} started fresh')
            + ']')
        if not as_expected and not report['corrupt']:
          failures.append(f'attempt {number}: restart did not continue from the latest '
                          f'checkpoint: {describe_restart(report)}{note}')
        if not resumed:
          failures.append(f'attempt {number}: restarted from scratch, not a resume '
                          f'(log {attempt.log_path}).')
        print(f'  restart {number - 1:>2}: {"resume" if resumed else "NOT A RESUME"}: '
              f'{describe_restart(report)}{note}', flush=True)
      if fatal:
        break
      if last:
        completed = True
        print(f'  attempt {number:>2}: ran to completion (exit code 0) in '
              f'{attempt.elapsed():.0f} s', flush=True)
        break
      kinds.append(kill.kind)
      kind = kill.kind + (f' ({event["variant"]})' if kill.kind == 'between' else '')
      print(f'  kill {number:>2}/{len(schedule)}: {kind:<33} at {event["at"]:6.1f} s after '
            f'launch; {event["trigger"]}\n'
            f'             workdir at the kill: {event["seen"]}'
            + (f'\n             after the kill:      {event["after"]}'
               if event['after'] != event['seen'] else ''), flush=True)
      previous_kill = dict(kill=kill, expected=expected_restart(killed_dir, stages))
      attempt.close()
  finally:
    if attempt is not None:
      attempt.close()
  killed_seconds = time.monotonic() - killed_start

  print()
  counts = ', '.join(f'{kinds.count(k)} {k}' for k in KINDS)
  print(f'kills:   {len(kinds)} ({counts})')
  print(f'resumes: {resumes} of {max(0, len(kinds))} restarts after a kill')
  print(f'unreadable checkpoints set aside: {len(corrupt)}'
        + ''.join(f'\n  {line.strip()[:300]}' for line in corrupt))
  print(f'unfinished save folders left by a kill and replaced by Orbax on the next save: '
        f'{leftovers}')
  for stage in stages:
    folder = os.path.join(killed_dir, stage.dir, 'corrupt_checkpoints')
    if os.path.isdir(folder):
      print(f'  {folder}: {sorted(os.listdir(folder))}')
  # Orbax renames a save to its step only once whole (with commit_success.txt in it); a
  # step folder without that file is an old checkpoint whose deletion a kill interrupted.
  half_deleted = []
  for stage in stages:
    steps = scan_checkpoints(killed_dir, stage)[0]
    for step in steps:
      if not os.path.exists(os.path.join(killed_dir, stage.dir, 'checkpoints', str(step),
                                         'commit_success.txt')):
        half_deleted.append(f'{stage.name}/checkpoints/{step}'
                            + (' (THE LATEST)' if step == steps[-1] else ''))
  print(f'step folders left half-deleted by a kill during Orbax clean-up of old checkpoints: '
        f'{", ".join(half_deleted) or "none"}')
  print(f'killed run: {killed_seconds:.0f} s wall time over {len(kinds) + 1} attempts')

  ok = not failures
  if completed:
    rows, identical = compare_runs(reference_dir, killed_dir, stages)
    print('\nFinal checkpoints, killed run vs uninterrupted run '
          '(every array of the train state):\n')
    print(format_table(rows))
    for row in rows:
      if row['missing']:
        print(f'  {row["stage"]}: arrays in only one run: {row["missing"][:10]}')
      if not row['ok']:
        failures.append(f'{row["stage"]}: the killed run differs from the uninterrupted one: '
                        + '; '.join(comparison_problems(row, stages)))
    ok &= identical
  if len(kinds) != len(schedule) or resumes != len(kinds):
    ok = False
  print(f'\ntotal wall time: {time.monotonic() - wall_start:.0f} s')
  for failure in failures:
    print(f'\nFAILURE: {failure}')
  print('\nRESULT: ' + ('PASS: bit-identical after every kill and resume' if ok else 'FAIL'))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
