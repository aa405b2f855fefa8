"""Soak test: kill the MAE -> WSP chain at random moments, resume it, compare bit for bit.

Runs `python main.py --config=configs/mae_then_wsp.py:demo --workdir=DIR`,
kills its whole process group with SIGKILL at `--kills` moments drawn from a
seeded schedule, restarts the same command after each kill, lets the last
attempt finish, and compares the final checkpoints of every stage with those
of an uninterrupted run of the same command: every array of the train state
must be bit-identical, and so must the global data position
(data_position/data_position.json, all but its 'written_by') and
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

Process counts (--process_counts=1,2 --devices=2): every attempt runs as P processes of
main.py on 127.0.0.1 (--coordinator_address with a fresh port, --num_processes=P,
--process_id=i; JAX_NUM_CPU_DEVICES=devices/P each, gloo collectives), P drawn per attempt
from a seeded plan (printed) in which about half the restarts change P and the others
keep it; the reference runs as 1 process x `devices` devices, with the distributed flags
too, so it sums over devices with gloo as the attempts do. A kill SIGKILLs every process
group of the attempt; the last attempt must end with every process exiting 0; each process
writes its own log (logs/attempt_NN.process_i.log). Without --process_counts every attempt
and the reference are one plain main.py, as this test always ran them.

Checked, in tables, all folded into PASS/FAIL:
  final train state  bit-identical for a stage every attempt of which (that restored or
                     initialized it) ran on the reference's launch: always so without
                     --process_counts. Where the process count changed: bit-identical,
                     or the parameters within ||dθ|| / ||θ|| < 1e-6 (max |diff| and
                     ||dθ|| / ||θ|| reported per stage), and then eval_results.json may
                     differ by what such parameters score (reported). With gloo on both
                     sides, 2 processes x 2 devices and 1 x 4 were measured bit-identical
                     (tests/test_elastic_resume.py); the bound is for a reduction over the
                     devices in another order, whose float32 rounding moved the parameters
                     by 4.2e-8 of their norm in 2 steps, 24x below it, while one step on
                     other examples moves them by ~3e-4. Measured here (2026-12-07, 1 or 2
                     processes over 2 devices, small and full demo): bit-identical.
  data position      the final checkpoints' data_position.json without 'written_by' (which
                     names the processes, devices and mesh that saved it).
  example keys       log.example_keys=True is passed to every stage of both runs: every
                     process appends the keys of the rows it reads (which example, crop and
                     flip) per global batch and column. Every (batch, column) of batches
                     0 .. total_steps-1 must have a record in both runs, and every record of
                     the killed run (all attempts, all processes, batches read ahead and read
                     again after a resume) must equal the reference's key.
  restarts           each resumes from the latest checkpoint the kill left.
Then the killed run's goodput, as `python -m big_pretrain.goodput DIR/killed` prints it, and
its total wall_seconds against the attempts' wall times measured here (launch to exit or
kill), with the difference in %: reported, not checked.

  python reliability/kill_resume.py                       # 20 kills, seed 0 (~11 min on 2 cores when WSP ran 600 steps)
  python reliability/kill_resume.py --kills=5 --seed=1 --reference_workdir=/tmp/maws_demo
  python reliability/kill_resume.py --config.stages.mae.total_steps=400  # overrides go to both runs
  python reliability/kill_resume.py --kills=4 --config.stages.mae.total_steps=200 --config.stages.wsp.total_steps=200  # ~3 min
  # 1 or 2 processes over 2 CPU devices: ~6.5 min (the reference 3 min: gloo over 2 devices
  # runs the demo 2-3x slower than one plain process on this 2-core box)
  python reliability/kill_resume.py --kills=4 --process_counts=1,2 --devices=2 --config.stages.mae.total_steps=200 --config.stages.wsp.total_steps=200
  python reliability/kill_resume.py --kills=4 --process_counts=1,2  # full demo chain: ~11.5 min
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import tempfile
import time

# Run from anywhere: the configs/, reliability and big_pretrain packages live at the
# repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# pylint: disable=wrong-import-position
from big_pretrain.tpu_slices import quiet_libtpu_without_tpu
from reliability.kill_schedule import (KINDS, Kill, Stage, config_spec_path, describe_workdir,
                                       final_checkpoint_saved, load_stages, plan_kills,
                                       scan_checkpoints, stage_is_finished, stage_override,
                                       tmp_step)
from reliability.example_keys import (compare_keys, describe_files, format_keys_table,
                                      keys_problems)
from reliability.goodput_report import goodput_tables, total_wall, wall_comparison
from reliability.process_plan import (Launch, change, default_env, free_port, parse_counts,
                                      plan_launches, process_args, process_env,
                                      reference_launch)
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
# ||dθ|| / ||θ|| of the parameters allowed where a stage's process count changed: see the
# module docstring.
RELATIVE_DIFF_BOUND = 1e-6
FAILED_GRACE_SECONDS = 15


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
  parser.add_argument('--process_counts', default=None,
                      help='e.g. 1,2: every attempt runs as P processes of main.py (P drawn '
                           'from these, per attempt) over --devices CPU devices, and the '
                           'reference as 1 process over them; default: one plain process')
  parser.add_argument('--devices', type=int, default=None,
                      help='with --process_counts: CPU devices in all, for every attempt '
                           '(default 2)')
  args, extra = parser.parse_known_args()
  bad = [arg for arg in extra if not arg.startswith('--config.')]
  if bad:
    parser.error(f'unknown arguments {bad}; only --config.KEY=VALUE overrides pass through.')
  if args.kills < 3:
    parser.error('--kills must be at least 3: one of each kind.')
  if args.process_counts is None:
    if args.devices is not None:
      parser.error('--devices is for --process_counts: a plain attempt uses the devices its '
                   'environment gives it.')
  else:
    try:
      args.process_counts = parse_counts(args.process_counts)
    except ValueError as error:
      parser.error(str(error))
    args.devices = 2 if args.devices is None else args.devices
    uneven = [p for p in args.process_counts if args.devices % p]
    if args.devices < 1 or uneven:
      parser.error(f'--devices={args.devices} must split evenly over every process count '
                   f'(not {uneven}).')
  return args, extra


# --- One attempt: main.py (or P processes of it), each in its own process group.


class Attempt:
  """main.py with `args`, as `launch` says: one plain process, or `launch.processes`
  processes with the distributed flags (a fresh coordinator port), each in its own process
  group (processes.ProcessGroup) with its own log. Process 0's log is followed line by line:
  which stage runs, the last step it logged, the save folders Orbax replaced."""

  def __init__(self, args: list[str], log_path: str, launch: Launch = Launch()):
    self.launch = launch
    self.started = time.monotonic()
    self.ended: float | None = None  # when every process had exited, or was killed
    count = 1 if launch.plain else launch.processes
    port = None if launch.plain else free_port()
    stem = log_path[:-len('.log')] if log_path.endswith('.log') else log_path
    self.log_paths = ([log_path] if launch.plain else
                      [f'{stem}.process_{i}.log' for i in range(count)])
    env = process_env(launch, default_env())
    self.processes: list[ProcessGroup] = []
    try:
      for i, path in enumerate(self.log_paths):
        self.processes.append(ProcessGroup([*args, *process_args(launch, port, i)], path,
                                           env=env))
    except BaseException:
      self.kill()
      raise
    self.log_path = self.log_paths[0]
    self._reader = open(self.log_path, 'rb')
    self._partial = b''
    self.lines: list[str] = []
    self.current_stage: str | None = None
    self.started_stages: list[str] = []
    self.logged_step: dict[str, int] = {}
    self.recreated_tmp: set[str] = set()  # paths of leftover temporary folders Orbax replaced
    self.codes: list[int | None] = [None] * count
    self.killed = False

  def elapsed(self) -> float:
    return (self.ended if self.ended is not None else time.monotonic()) - self.started

  def read_log(self) -> None:
    """Takes in the lines written since the last call."""
    if self._reader.closed:
      return
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

  def poll(self) -> int | None:
    """None while any process runs and none has failed; else the first non-zero exit code,
    or 0 once every process exited 0."""
    self.codes = [p.poll() for p in self.processes]
    failed = [code for code in self.codes if code not in (None, 0)]
    if failed:
      return failed[0]
    if None in self.codes:
      return None
    if self.ended is None:
      self.ended = time.monotonic()
    return 0

  def kill(self) -> None:
    """SIGKILL to every process group of the attempt, all at once: no child survives."""
    for process in self.processes:
      process.signal(signal.SIGKILL)
    for process in self.processes:
      process.popen.wait()
    if self.ended is None:
      self.ended = time.monotonic()
    self.killed = True
    self.codes = [p.poll() for p in self.processes]

  def wait(self, timeout: float) -> int | None:
    """The exit code (poll's) once every process has exited; None if one still ran `timeout`
    seconds after the launch, and all were killed. When one process fails, the others get
    FAILED_GRACE_SECONDS to stop on their own (a peer waiting in a collective would wait for
    the runtime's heartbeat), then are killed."""
    failed_at = None
    try:
      while True:
        rc = self.poll()
        if rc == 0:
          return 0
        if rc is not None:
          failed_at = failed_at or time.monotonic()
          if None not in self.codes:
            self.ended = self.ended or time.monotonic()
            return rc
          if time.monotonic() - failed_at > FAILED_GRACE_SECONDS:
            self.kill()
            return rc
        if self.elapsed() > timeout:
          self.kill()
          return None
        time.sleep(0.05)
    finally:
      self.read_log()

  def close(self) -> None:
    if any(p.poll() is None for p in self.processes):
      self.kill()
    self.poll()
    if self.ended is None:  # every process had exited, one of them with an error
      self.ended = time.monotonic()
    self.read_log()
    self._reader.close()

  def describe_codes(self) -> str:
    return ', '.join(f'process {i}: {"running" if code is None else code}'
                     for i, code in enumerate(self.codes))

  def tail(self, n: int = 25) -> str:
    self.read_log()
    if len(self.processes) == 1:
      return '\n'.join(self.lines[-n:])
    parts = []
    for i, path in enumerate(self.log_paths):
      with open(path, errors='replace') as f:
        parts.append(f'--- process {i} ({path}):\n' + '\n'.join(f.read().splitlines()[-n:]))
    return '\n'.join(parts)


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
    rc = attempt.poll()
    if rc is not None:
      attempt.read_log()
      raise AttemptFailed(
          f'the attempt exited (code {rc}; {attempt.describe_codes()}) before this kill was '
          'due' + (' (it finished the whole run)' if rc == 0 else '') + '.')
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


def run_reference(args: list[str], log_path: str, timeout: float, launch: Launch) -> float:
  attempt = Attempt(args, log_path, launch)
  try:
    rc = attempt.wait(timeout)
  finally:
    attempt.close()
  logs = ', '.join(attempt.log_paths)
  if rc is None:
    sys.exit(f'The reference run took over {timeout:.0f} s; see {logs}.')
  if rc != 0:
    sys.exit(f'The reference run failed (exit code {rc}; {attempt.describe_codes()}); see '
             f'{logs}:\n{attempt.tail()}')
  return attempt.elapsed()


def with_example_keys(overrides: list[str], stages: list[Stage]) -> list[str]:
  """`overrides` with log.example_keys=True for every stage (unless the caller set it)."""
  added = [stage_override(stage, 'log.example_keys', True) for stage in stages]
  given = {arg.split('=')[0] for arg in overrides}
  return overrides + [arg for arg in added if arg.split('=')[0] not in given]


def stage_launches(attempts: list[Attempt], stages: list[Stage]) -> dict[str, set[Launch]]:
  """{stage: the launches of the attempts whose process 0 logged that the stage restored a
  checkpoint or initialized its state (it may have trained; one killed before that did not)}."""
  decided = []
  for attempt in attempts:
    report = restart_report(attempt)
    decided.append({name for name, _ in report['resumed']} | set(report['fresh']))
  return {stage.name: {a.launch for a, names in zip(attempts, decided) if stage.name in names}
          for stage in stages}


def main():
  args, user_overrides = parse_args()
  # This process reads checkpoints with JAX: without TPU chips, libtpu (when installed) would
  # complain on stderr when the backend starts. main.py sets the same.
  quiet_libtpu_without_tpu()
  config_spec = config_spec_path(args.config)
  stages = load_stages(config_spec, user_overrides)
  overrides = with_example_keys(user_overrides, stages)
  for stage in stages:
    for count in args.process_counts or []:
      if stage.batch_size % args.devices or stage.batch_size % count:
        sys.exit(f'{stage.name}: batch_size {stage.batch_size} does not split over '
                 f'{args.devices} devices and {count} processes.')
  rng = random.Random(args.seed)
  schedule = plan_kills(rng, args.kills, stages)
  launches = plan_launches(args.seed, args.process_counts, args.devices, len(schedule) + 1)
  ref_launch = reference_launch(args.process_counts, args.devices)
  root = prepare_root(args.workdir)
  killed_dir = os.path.join(root, 'killed')
  log_dir = os.path.join(root, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  print(f'workdir: {root}  (killed run: {killed_dir}; logs: {log_dir})')
  example = main_args(config_spec, overrides, killed_dir)
  if not launches[0].plain:
    example += process_args(launches[0], 'PORT', 0)
    print(f'command of each process i of P (JAX_NUM_CPU_DEVICES={args.devices}/P): '
          + ' '.join(command(example)).replace('--process_id=0', '--process_id=i')
          .replace(f'--num_processes={launches[0].processes}', '--num_processes=P'))
  else:
    print('command: ' + ' '.join(command(example)))
  print('stages: ' + ', '.join(f'{s.name} ({s.total_steps} steps, saves every {s.save_every}, '
                               f'batch {s.batch_size})' for s in stages))
  print(f'\nKill schedule (seed {args.seed}):')
  for i, kill in enumerate(schedule, 1):
    print(f'  {i:>2}. {kill.plan(stages)}')
  if args.process_counts:
    print(f'\nProcesses (seed {args.seed}; {args.devices} CPU devices in every attempt; '
          f'reference: {ref_launch}):')
    for i, launch in enumerate(launches, 1):
      restart = '' if i == 1 else f'   restart {i - 1:>2}: {change(launches[i - 2], launch)}'
      print(f'  attempt {i:>2}: {str(launch):<24}{restart}')
    changed = sum(a != b for a, b in zip(launches, launches[1:]))
    print(f'  restarts that change the process count: {changed} of {len(launches) - 1}')
  sys.stdout.flush()

  wall_start = time.monotonic()
  if args.reference_workdir:
    reference_dir = os.path.abspath(args.reference_workdir)
    missing = [s.name for s in stages if not stage_is_finished(reference_dir, s)]
    if missing:
      sys.exit(f'--reference_workdir={reference_dir} has unfinished stages {missing}.')
    print(f'\nReference: reusing {reference_dir} (taken to have run as {ref_launch})')
  else:
    reference_dir = os.path.join(root, 'reference')
    print(f'\nReference: uninterrupted run ({ref_launch}) in {reference_dir} ...', flush=True)
    seconds = run_reference(main_args(config_spec, overrides, reference_dir),
                            os.path.join(log_dir, 'reference.log'), 3 * args.attempt_timeout,
                            ref_launch)
    print(f'Reference: finished in {seconds:.0f} s.')

  print(f'\nKilled run in {killed_dir}:', flush=True)
  killed_start = time.monotonic()
  killed_args = main_args(config_spec, overrides, killed_dir)
  failures, kinds, resumes, corrupt, leftovers = [], [], 0, [], 0
  previous_kill, completed = None, False
  attempt = None
  attempts: list[Attempt] = []
  try:
    for number in range(1, len(schedule) + 2):
      launch = launches[number - 1]
      attempt = Attempt(killed_args, os.path.join(log_dir, f'attempt_{number:02d}.log'), launch)
      attempts.append(attempt)
      last = number > len(schedule)
      fatal = False
      try:
        if last:
          rc = attempt.wait(args.attempt_timeout)
          if rc is None:
            raise AttemptFailed(f'the last attempt ran over {args.attempt_timeout:.0f} s.')
          if rc != 0:
            raise AttemptFailed(f'the last attempt exited with code {rc} '
                                f'({attempt.describe_codes()}).')
        else:
          kill = schedule[number - 1]
          event = run_until_kill(attempt, kill, killed_dir, stages, args.attempt_timeout)
      except AttemptFailed as error:
        fatal = True
        failures.append(f'attempt {number}: {error}\n    logs {", ".join(attempt.log_paths)}, '
                        'last lines:\n'
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
        processes = ('' if launch.plain else
                     f' [{change(launches[number - 2], launch)}'
                     + (f': {launch}' if launch == launches[number - 2] else '') + ']')
        print(f'  restart {number - 1:>2}: {"resume" if resumed else "NOT A RESUME"}: '
              f'{describe_restart(report)}{note}{processes}', flush=True)
      elif not launch.plain:
        print(f'  attempt  1: {launch}', flush=True)
      if fatal:
        break
      if last:
        completed = True
        print(f'  attempt {number:>2}: ran to completion (exit code 0'
              + ('' if launch.plain or launch.processes == 1
                 else f' from all {launch.processes} processes')
              + f') in {attempt.elapsed():.0f} s', flush=True)
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
  if args.process_counts:
    ran = launches[:len(attempts)]
    changes = [f'{i}: {change(a, b)}' for i, (a, b) in enumerate(zip(ran, ran[1:]), 1) if a != b]
    print(f'process counts: {" | ".join(str(l) for l in ran)}; restarts that changed it: '
          f'{len(changes)} of {len(ran) - 1} ({"; ".join(changes) or "none"})')
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
  print(f'killed run: {killed_seconds:.0f} s wall time over {len(attempts)} attempts')

  ok = not failures
  if completed:
    # A stage trained on one launch throughout, the reference's, must be bit-identical; one
    # whose process count changed may differ by the rounding of another reduction order.
    # (The attempts that restored or initialized it count: a superset of those that trained.)
    ran_on = stage_launches(attempts, stages)
    exact = {name: not (launches_of - {ref_launch}) for name, launches_of in ran_on.items()}
    rows, identical = compare_runs(reference_dir, killed_dir, stages, exact,
                                   RELATIVE_DIFF_BOUND)
    print('\nFinal checkpoints, killed run vs uninterrupted run '
          '(every array of the train state):\n')
    print(format_table(rows))
    for row in rows:
      print(f'  {row["stage"]}: killed run on {", ".join(sorted(map(str, ran_on[row["stage"]])))}'
            f'; reference on {ref_launch}'
            + ('' if row['exact'] else
               f'; bound ||dθ||/||θ|| < {RELATIVE_DIFF_BOUND:g} unless bit-identical'))
      if row['missing']:
        print(f'  {row["stage"]}: arrays in only one run: {row["missing"][:10]}')
      if not row['ok']:
        failures.append(f'{row["stage"]}: the killed run differs from the uninterrupted one: '
                        + '; '.join(comparison_problems(row, stages)))
    ok &= identical

    key_rows = compare_keys(reference_dir, killed_dir, stages)
    print('\nExample keys (config.log.example_keys: which example, crop and flip in each column '
          'of each global batch), every record of the killed run (all attempts, all processes, '
          'batches read again and read ahead) vs the uninterrupted run:\n')
    print(format_keys_table(key_rows))
    print('\n'.join(describe_files(key_rows)))
    for row in key_rows:
      if not row['ok']:
        failures.append(f'{row["stage"]}: example keys: ' + '; '.join(keys_problems(row)))
        ok = False

  attempt_seconds = [a.elapsed() for a in attempts]
  print('\nAttempts of the killed run (launch to exit or kill): ' + ', '.join(
      f'{i}: {s:.1f} s ({"killed" if a.killed else "exited"}'
      + ('' if a.launch.plain else f', {a.launch}') + ')'
      for i, (a, s) in enumerate(zip(attempts, attempt_seconds), 1)))
  code, output, walls = goodput_tables(killed_dir)
  print(f'\nGoodput of the killed run (python -m big_pretrain.goodput {killed_dir}'
        + (f'; exit code {code}' if code else '') + '):\n')
  print(output)
  print('\n' + wall_comparison(attempt_seconds, total_wall(walls)))

  if len(kinds) != len(schedule) or resumes != len(kinds):
    ok = False
  print(f'\ntotal wall time: {time.monotonic() - wall_start:.0f} s')
  for failure in failures:
    print(f'\nFAILURE: {failure}')
  print('\nRESULT: ' + ('PASS: ' + ('bit-identical after every kill and resume'
                                    if not completed or all(r['bit_identical'] for r in rows)
                                    else 'every kill and resume within the bounds above')
                        + ', the same example keys throughout' if ok else 'FAIL'))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
