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

  python reliability/kill_resume.py                       # 20 kills, seed 0 (~11 min on 2 cores when WSP ran 600 steps)
  python reliability/kill_resume.py --kills=5 --seed=1 --reference_workdir=/tmp/maws_demo
  python reliability/kill_resume.py --config.stages.mae.total_steps=400  # overrides go to both runs
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time

# Run from anywhere: the configs/, reliability and big_pretrain packages live at the
# repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# pylint: disable=wrong-import-position
from reliability.kill_schedule import (KINDS, Kill, Stage, config_spec_path, describe_workdir,
                                       final_checkpoint_saved, load_stages, plan_kills,
                                       scan_checkpoints, stage_is_finished, tmp_step)
from reliability.processes import ProcessGroup, command
from reliability.run_comparison import comparison_problems, compare_runs, format_table

# What main.py logs (absl, to stderr).
_STAGE_START = re.compile(r"Stage '([^']+)': training in")
_STAGE_SKIP = re.compile(r"Stage '([^']+)' finished earlier")
_RESUMING = re.compile(r'Resuming at step (\d+) of (\d+)')
# A stage killed between its final checkpoint and its final evaluations resumes there.
_FINAL_EVALUATIONS = re.compile(r'finished training at step (\d+), but its final evaluations')
_STEP_LOGGED = re.compile(r'\] \[(\d+)\] ')  # the metric writer's console line: "[250] loss=..."
_INITIALISED = 'Initialized params/'
_CORRUPT = 'cannot be read'
_TMP_LEFTOVER = 'Removing existing directory since it is not finalized'
_TMP_RECREATED = re.compile(r'Attempted to create temporary directory (\S+) which already exists')
_DECIDED = 'Parameters:'  # loop.py logs it once the stage has restored or initialized its state

POLL_SECONDS = 0.005


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


# --- One attempt: main.py in its own process group, its output in a log file.


class Attempt:
  """main.py with `args` in its own process group (processes.ProcessGroup), its log followed
  line by line: which stage runs, the last step it logged, the save folders Orbax replaced."""

  def __init__(self, args: list[str], log_path: str):
    self.log_path = log_path
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
    self.process = ProcessGroup(args, log_path, env=env)
    self._reader = open(log_path, 'rb')
    self._partial = b''
    self.lines: list[str] = []
    self.current_stage: str | None = None
    self.started_stages: list[str] = []
    self.logged_step: dict[str, int] = {}
    self.recreated_tmp: set[str] = set()  # paths of leftover temporary folders Orbax replaced

  def elapsed(self) -> float:
    return self.process.elapsed()

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
    self.process.kill()

  def wait(self, timeout: float) -> int | None:
    """The exit code; None if it still ran `timeout` seconds after its start, and was killed."""
    try:
      return self.process.wait(timeout)
    finally:
      self.read_log()

  def close(self) -> None:
    if self.process.poll() is None:
      self.kill()
    self.read_log()
    self._reader.close()

  def tail(self, n: int = 25) -> str:
    self.read_log()
    return '\n'.join(self.lines[-n:])


def main_args(config_spec: str, overrides: list[str], run_dir: str) -> list[str]:
  return [f'--config={config_spec}', f'--workdir={run_dir}', *overrides]


class AttemptFailed(RuntimeError):
  pass


def run_until_kill(attempt: Attempt, kill: Kill, run_dir: str, stages: list[Stage],
                   timeout: float) -> dict:
  """Polls the attempt's log and checkpoint folders; SIGKILLs it when `kill` is due."""
  names = [s.name for s in stages]
  first = stages[0]
  finished_at_start = final_checkpoint_saved(run_dir, stages[kill.stage])
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
    rc = attempt.process.poll()
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
        if variant == 'stage finished' and final_checkpoint_saved(run_dir, stages[kill.stage]):
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
  skipped, resumed, fresh, undecided, initialized = [], [], [], [], []
  stage, decided = None, True
  for line in attempt.lines:
    if match := _STAGE_SKIP.search(line):
      skipped.append(match.group(1))
    elif match := _STAGE_START.search(line):
      if stage is not None and not decided:
        undecided.append(stage)
      stage, decided = match.group(1), False
    elif (match := _RESUMING.search(line) or _FINAL_EVALUATIONS.search(line)) and not decided:
      resumed.append((stage, int(match.group(1))))
      decided = True
    elif _INITIALISED in line:
      initialized.append(stage)
    elif _DECIDED in line and not decided:
      fresh.append(stage)
      decided = True
  if stage is not None and not decided:
    undecided.append(stage)  # killed before it restored or initialized anything
  return dict(
      skipped=skipped, resumed=resumed, fresh=fresh, undecided=undecided,
      initialized=initialized,
      corrupt=[line for line in attempt.lines if _CORRUPT in line],
      tmp_leftovers=[line for line in attempt.lines if _TMP_LEFTOVER in line],
  )


def is_resume(report: dict) -> bool:
  return bool(report['skipped'] or report['resumed'])


def expected_restart(run_dir: str, stages: list[Stage]) -> tuple[list[str], str, int | None]:
  """(stages to skip, stage to continue, its step or None for a fresh start) after a kill."""
  skipped = []
  for stage in stages:
    if stage_is_finished(run_dir, stage):
      skipped.append(stage.name)
      continue
    finished, _ = scan_checkpoints(run_dir, stage)
    return skipped, stage.name, (finished[-1] if finished else None)
  return skipped, '', None


def describe_restart(report: dict) -> str:
  parts = [f'{s} skipped' for s in report['skipped']]
  parts += [f'{s} resumed at step {step}' for s, step in report['resumed']]
  parts += [f'{s} started fresh'
            + (' (from the previous stage)' if s in report['initialized'] else '')
            for s in report['fresh']]
  parts += [f'{s} killed before restoring' for s in report['undecided']]
  if report['corrupt']:
    parts.append(f'{len(report["corrupt"])} unreadable checkpoint(s) set aside')
  if report['tmp_leftovers']:
    parts.append(f'{len(report["tmp_leftovers"])} unfinished save folder(s) replaced by Orbax')
  return ', '.join(parts) or 'nothing logged yet'



# --- The whole test.


def prepare_root(workdir: str | None) -> str:
  if workdir is None:
    return tempfile.mkdtemp(prefix='kill_resume_')
  if os.path.isdir(workdir) and os.listdir(workdir):
    sys.exit(f'--workdir={workdir} is not empty: the soak test needs a fresh folder.')
  os.makedirs(workdir, exist_ok=True)
  return os.path.abspath(workdir)


def run_reference(args: list[str], log_path: str, timeout: float) -> float:
  start = time.monotonic()
  attempt = Attempt(args, log_path)
  try:
    rc = attempt.wait(timeout)
  finally:
    attempt.close()
  if rc is None:
    sys.exit(f'The reference run took over {timeout:.0f} s; see {log_path}.')
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
  print('command: ' + ' '.join(command(main_args(config_spec, overrides, killed_dir))))
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
    seconds = run_reference(main_args(config_spec, overrides, reference_dir),
                            os.path.join(log_dir, 'reference.log'), 3 * args.attempt_timeout)
    print(f'Reference: finished in {seconds:.0f} s.')

  print(f'\nKilled run in {killed_dir}:', flush=True)
  killed_start = time.monotonic()
  killed_args = main_args(config_spec, overrides, killed_dir)
  failures, kinds, resumes, corrupt, leftovers = [], [], 0, [], 0
  previous_kill, completed = None, False
  attempt = None
  try:
    for number in range(1, len(schedule) + 2):
      attempt = Attempt(killed_args, os.path.join(log_dir, f'attempt_{number:02d}.log'))
      last = number > len(schedule)
      fatal = False
      try:
        if last:
          rc = attempt.wait(args.attempt_timeout)
          if rc is None:
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
