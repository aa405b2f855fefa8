"""The checks of reliability/bad_inputs.py: how a case runs main.py and what it observed.

A check runs main.py (reliability/processes.py) with the tiny config in the case's own
folder, and returns what it observed: the run, what the workdir lost, and any follow-up run
that did not resume or finish; bad_inputs.verdict judges that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Callable

from big_pretrain.errors import EXIT_PREEMPTED, EXIT_STOPPED, EXIT_USAGE
from reliability.processes import MAIN, REPO, ProcessGroup, Run

EXIT_OK = 0
MAIN_PY = 'main.py'
POLL_SECONDS = 0.05
BASE_TOTAL_STEPS = 4     # the shared workdir stops here; the config says 6 (an allowed change)


def _main_env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             TF_CPP_MIN_LOG_LEVEL='2', TF_ENABLE_ONEDNN_OPTS='0')
  env.pop('BIG_PRETRAIN_VERBOSE', None)  # the one-line messages are what is measured
  # -O0 code generation compiles ~3x faster; the tiny model runs fast anyway.
  env['XLA_FLAGS'] = ('--xla_backend_optimization_level=0 '
                      f'--xla_force_host_platform_device_count={devices}')
  return env


@dataclasses.dataclass
class Context:
  """What a case may use: its own folder, the tiny config and the shared fixtures."""
  folder: str
  config: str                    # path of the tiny config file
  fixtures: str                  # image folders and the trained workdirs
  timeout: float
  cache: str                     # JAX compilation cache shared by every run
  _runs: int = 0

  def start(self, *args: str, devices: int = 1, env_overrides=None,
            program: str = MAIN_PY) -> ProcessGroup:
    """main.py (or another of the project's commands, `program`) with `args`."""
    self._runs += 1
    env = _main_env(devices)
    env.update(env_overrides or {})
    env['JAX_COMPILATION_CACHE_DIR'] = self.cache
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    script = MAIN if program == MAIN_PY else f'-m {program}'
    return ProcessGroup(list(args), os.path.join(self.folder, f'run{self._runs}.log'), env=env,
                        script=script)

  def main(self, *args: str, devices: int = 1, env_overrides=None) -> Run:
    return self.start(*args, devices=devices, env_overrides=env_overrides).finish(self.timeout)

  def command(self, program: str, *args: str) -> Run:
    """One of the project's other commands (a module: 'big_pretrain.export'), run to its end."""
    return self.start(*args, program=program).finish(self.timeout)

  def fresh(self) -> str:
    """--workdir= a new folder of the case's, which a refused run must leave unwritten."""
    return f'--workdir={os.path.join(self.folder, "fresh")}'

  def tiny(self, variant: str = '') -> str:
    return f'--config={self.config}' + (f':{variant}' if variant else '')

  def fixture(self, name: str) -> str:
    return os.path.join(self.fixtures, name)

  def trained_copy(self, base: str = 'trained') -> str:
    """A copy of a shared trained workdir that this case may change."""
    workdir = os.path.join(self.folder, 'run')
    shutil.copytree(self.fixture(base), workdir)
    return workdir


# --- What a case found.

REFUSE = 'refuse'      # a non-zero exit with one clear line; nothing in the workdir changed
CARRY_ON = 'carry on'  # handled: finished, or saved and stopped as documented


@dataclasses.dataclass
class Observed:
  """What one case saw; bad_inputs.verdict judges it."""
  run: Run | None                 # None: not run here
  expect: str                     # REFUSE or CARRY_ON
  exit_codes: tuple[int, ...]     # the documented exit codes for this case
  evidence: str = ''              # a regex the output must match (the message or log line)
  lost: list[str] = dataclasses.field(default_factory=list)      # what was lost or changed
  problems: list[str] = dataclasses.field(default_factory=list)  # a follow-up that failed
  extra_output: str = ''          # other runs of the case (checked for tracebacks too)
  not_run: str = ''               # why the case could not run on this machine
  program: str = 'main.py'        # the command run: its one-line messages start '<program>: '


# --- The workdir before and after: was anything lost?


def fingerprint(workdir: str) -> dict[str, str]:
  """Relative path -> content hash of the recorded config and every checkpoint file."""
  prints = {}
  for root, _, files in os.walk(workdir):
    relative_root = os.path.relpath(root, workdir)
    if not (relative_root.startswith('checkpoints') or relative_root == '.'):
      continue
    for name in files:
      if relative_root == '.' and not name.startswith('config'):
        continue  # logs and events may grow; config.json and its history may not
      with open(os.path.join(root, name), 'rb') as f:
        prints[os.path.join(relative_root, name)] = hashlib.sha1(f.read()).hexdigest()
  return prints


def changes_between(before: dict[str, str], after: dict[str, str]) -> list[str]:
  gone = sorted(path for path in before if path not in after)
  changed = sorted(path for path in before if path in after and before[path] != after[path])
  lost = [f'{len(gone)} files gone ({gone[0]}...)'] if gone else []
  return lost + [f'{path} changed' for path in changed[:3]]


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  try:
    return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())
  except FileNotFoundError:
    return []


def wait_for_checkpoint(process: ProcessGroup, checkpoint_dir: str, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if checkpoint_steps(checkpoint_dir):
      return True
    time.sleep(POLL_SECONDS)
  return False


# --- The checks.


def refused_unchanged(ctx: Context, *args: str, evidence: str,
                      damage: Callable[[str], None] | None = None,
                      exit_codes=(EXIT_STOPPED, EXIT_USAGE)) -> Observed:
  """A restart of a copy of the trained workdir (first damaged by `damage`, if given) that
  must be refused, with nothing changed."""
  workdir = ctx.trained_copy()
  if damage:
    damage(workdir)
  before = fingerprint(workdir)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}', *args)
  return Observed(run, REFUSE, exit_codes, evidence,
                  lost=changes_between(before, fingerprint(workdir)))


def refused_at_start(ctx: Context, *args: str, evidence: str, devices: int = 1) -> Observed:
  """A fresh run that must be refused before anything is written."""
  run = ctx.main(*args, devices=devices)
  observed = Observed(run, REFUSE, (EXIT_USAGE,), evidence)
  workdir = os.path.join(ctx.folder, 'fresh')
  if os.path.exists(workdir):
    observed.problems.append(f'{workdir} was written')
  return observed


def resume_allowed(ctx: Context, *args: str, evidence: str) -> Observed:
  """A restart that resumes: it must finish, from a saved step, keeping what was saved."""
  workdir = ctx.trained_copy()
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}', *args)
  observed = Observed(run, CARRY_ON, (EXIT_OK,), evidence)
  if checkpoint_steps(os.path.join(workdir, 'checkpoints'))[-1:] != [6]:
    observed.problems.append('no final checkpoint at step 6')
  return observed


def unreadable_checkpoint(ctx: Context, damage: Callable[[str], None], evidence: str) -> Observed:
  """Damages checkpoint 4 of a copy; the run must set it aside and go on from step 2."""
  workdir = ctx.trained_copy()
  damage(os.path.join(workdir, 'checkpoints', '4'))
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), evidence)
  set_aside = os.listdir(os.path.join(workdir, 'corrupt_checkpoints')) if os.path.isdir(
      os.path.join(workdir, 'corrupt_checkpoints')) else []
  if not any(name.startswith('4-') for name in set_aside):
    observed.lost.append('damaged checkpoint 4 not in corrupt_checkpoints/')
  if 'Resuming at step 2 of 6' not in run.output:
    observed.problems.append('did not resume from step 2')
  return observed


def remove_metadata(checkpoint: str) -> None:
  os.remove(os.path.join(checkpoint, 'state', '_METADATA'))


def remove_arrays(checkpoint: str) -> None:
  for root, _, files in os.walk(os.path.join(checkpoint, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        os.remove(os.path.join(root, name))


def cut_in_half(path: str) -> None:
  """Truncates `path` to half its bytes, as a full disk or an unfinished copy leaves it."""
  os.truncate(path, os.path.getsize(path) // 2)


def truncate_largest(checkpoint: str) -> None:
  files = [os.path.join(root, name) for root, _, names in os.walk(checkpoint) for name in names]
  cut_in_half(max(files, key=os.path.getsize))


def image_folder_run(ctx: Context, train: str, *, expect: str, exit_codes, evidence: str,
                     variant: str = '', test: str = '') -> Observed:
  args = [ctx.tiny(variant), ctx.fresh(), '--config.data.source=image_folder',
          f'--config.data.path={ctx.fixture(train)}']
  if test:
    args.append(f'--config.data.test_path={ctx.fixture(test)}')
  return Observed(ctx.main(*args), expect, exit_codes, evidence)


def held_out_smaller_than_batch(ctx: Context) -> Observed:
  observed = image_folder_run(ctx, 'good_images', expect=CARRY_ON, exit_codes=(EXIT_OK,),
                              evidence="'test' split has 7 examples", variant='recon',
                              test='held_out_7')
  workdir = os.path.join(ctx.folder, 'fresh')
  if checkpoint_steps(os.path.join(workdir, 'checkpoints'))[-1:] != [6]:
    observed.lost.append('no final checkpoint')
  rerun = ctx.main(*observed.run.args)  # must not crash the same way again
  observed.extra_output = rerun.output
  if rerun.rc != EXIT_OK or 'nothing to do' not in rerun.output and 'finished earlier' not in (
      rerun.output):
    observed.problems.append(f'the rerun exited {rerun.rc} without "finished earlier"')
  return observed


def read_only_workdir(ctx: Context) -> Observed:
  return on_a_read_only_mount(ctx, lambda mount_point: refused_at_start(
      ctx, ctx.tiny(), f'--workdir={mount_point}/run', evidence='not writable'))


def on_a_read_only_mount(ctx: Context, check: Callable[[str], Observed]) -> Observed:
  """`check(mount_point)` with a read-only tmpfs mounted in the case's folder; 'not run here'
  where mounting fails."""
  with tmpfs(os.path.join(ctx.folder, 'read_only'), 'ro,size=1m') as mount_point:
    if mount_point is None:
      return Observed(None, REFUSE, (EXIT_USAGE,), not_run='mounting a read-only tmpfs failed')
    return check(mount_point)


@contextlib.contextmanager
def tmpfs(mount_point: str, options: str):
  """A tmpfs mounted at `mount_point` while the block runs; None where mounting fails."""
  os.makedirs(mount_point)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', mount_point],
                    capture_output=True, check=False).returncode != 0:
    yield None
    return
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', '-l', mount_point], capture_output=True, check=False)


def two_runs_at_once(ctx: Context) -> Observed:
  workdir = os.path.join(ctx.folder, 'shared')
  first = ctx.start(ctx.tiny(), f'--workdir={workdir}')
  second = ctx.start(ctx.tiny(), f'--workdir={workdir}')
  runs = [first.finish(ctx.timeout), second.finish(ctx.timeout)]
  refused = [run for run in runs if run.rc == EXIT_USAGE]
  finished = [run for run in runs if run.rc == EXIT_OK]
  shown = refused[0] if refused else runs[1]
  other = runs[0] if shown is runs[1] else runs[1]
  observed = Observed(shown, REFUSE, (EXIT_USAGE,), 'in use by another run',
                      extra_output=other.output)
  if other.timed_out:
    observed.run = other  # a hang of either is the verdict
  elif len(finished) != 1:
    observed.problems.append(f'exit codes {[run.rc for run in runs]}, not one 0 and one 2')
  elif checkpoint_steps(os.path.join(workdir, 'checkpoints'))[-1:] != [6]:
    observed.lost.append('no final checkpoint')
  return observed


def long_run_args(ctx: Context, workdir: str, checkpoint_every: int = 50) -> list[str]:
  """A run long enough to signal in the middle of: 300 steps."""
  return [ctx.tiny(), f'--workdir={workdir}', '--config.total_steps=300',
          f'--config.checkpoint.every_steps={checkpoint_every}', '--config.log.every_steps=50']


def signalled(ctx: Context, signals: tuple[int, ...], exit_codes, evidence: str,
              resume: bool) -> Observed:
  """Signals a run once its first checkpoint is saved; then (optionally) resumes it."""
  workdir = os.path.join(ctx.folder, 'run')
  args = long_run_args(ctx, workdir)
  process = ctx.start(*args)
  if not wait_for_checkpoint(process, os.path.join(workdir, 'checkpoints'), ctx.timeout):
    return Observed(process.finish(ctx.timeout), CARRY_ON, exit_codes, evidence,
                    problems=['no checkpoint before the run ended'])
  saved_before = checkpoint_steps(os.path.join(workdir, 'checkpoints'))
  for signum in signals:
    process.signal(signum)
    time.sleep(0.02)
  observed = Observed(process.finish(ctx.timeout), CARRY_ON, exit_codes, evidence)
  saved_after = checkpoint_steps(os.path.join(workdir, 'checkpoints'))
  if not saved_after or saved_after[-1] < saved_before[-1]:
    observed.lost.append(f'checkpoints {saved_before} before, {saved_after} after')
  if observed.run.rc == EXIT_PREEMPTED and saved_after[-1] == saved_before[-1] and (
      'saved a checkpoint at step' not in observed.run.output):
    observed.problems.append('exit 75 without a saved step')
  if resume:
    rerun = ctx.main(*args)
    observed.extra_output = rerun.output
    resumed = re.search(r'Resuming at step (\d+)', rerun.output)
    if rerun.rc != EXIT_OK or not resumed or int(resumed.group(1)) < saved_after[-1]:
      observed.problems.append(f'the same command then exited {rerun.rc}, '
                               f'resuming at {resumed.group(1) if resumed else "no step"}')
  return observed


def signalled_at_start(ctx: Context, signum: int, exit_codes, evidence: str, *,
                       after_line: str | None = None, delay: float = 0.0) -> Observed:
  """Signals a new run while it starts up: once its run lock is taken, or `delay` s after the
  log line `after_line` (e.g. while the step compiles). The lock must be released."""
  workdir = os.path.join(ctx.folder, 'run')
  lock = os.path.join(workdir, 'run.lock')
  process = ctx.start(ctx.tiny(), f'--workdir={workdir}')
  deadline = time.monotonic() + ctx.timeout
  while process.poll() is None and time.monotonic() < deadline and not (
      os.path.exists(lock) if after_line is None else after_line in process.output()):
    time.sleep(POLL_SECONDS)
  time.sleep(delay)
  process.signal(signum)
  observed = Observed(process.finish(ctx.timeout), CARRY_ON, exit_codes, evidence)
  if os.path.exists(lock):
    observed.problems.append('run.lock left behind')
  return observed


def disk_full(ctx: Context) -> Observed:
  """The workdir on a 64 MiB tmpfs, filled up once the first checkpoint is saved."""
  with tmpfs(os.path.join(ctx.folder, 'small_disk'), 'size=64m') as mount_point:
    if mount_point is None:
      return Observed(None, REFUSE, (EXIT_STOPPED,), not_run='mounting a tmpfs failed')
    workdir = os.path.join(mount_point, 'run')
    # A save every 2 steps: the next one comes right after the disk fills.
    args = long_run_args(ctx, workdir, checkpoint_every=2)
    process = ctx.start(*args)
    if not wait_for_checkpoint(process, os.path.join(workdir, 'checkpoints'), ctx.timeout):
      return Observed(process.finish(ctx.timeout), REFUSE, (EXIT_STOPPED,),
                      problems=['no checkpoint before the run ended'])
    filler = os.path.join(mount_point, 'filler')
    _fill(filler)
    observed = Observed(process.finish(ctx.timeout), REFUSE, (EXIT_STOPPED,),
                        'No space left on device')
    saved = checkpoint_steps(os.path.join(workdir, 'checkpoints'))
    os.remove(filler)  # space again: the same command must resume from what was kept
    rerun = ctx.main(*args)
    observed.extra_output = rerun.output
    if not saved:
      observed.lost.append('no checkpoint left')
    elif rerun.rc != EXIT_OK or f'Resuming at step {saved[-1]} of' not in rerun.output:
      observed.problems.append(f'after freeing space the same command exited {rerun.rc} '
                               f'without resuming at step {saved[-1]}')
    return observed


def _fill(path: str) -> None:
  chunk = b'\0' * (1 << 20)
  with open(path, 'wb', buffering=0) as f:
    try:
      while True:
        f.write(chunk)
    except OSError:
      pass
    try:  # the last few KiB
      while True:
        f.write(chunk[:4096])
    except OSError:
      pass


def chain_unreadable(ctx: Context) -> Observed:
  workdir = ctx.trained_copy('chain')
  remove_metadata(os.path.join(workdir, 'mae', 'checkpoints', '4'))
  run = ctx.main(ctx.tiny('chain'), f'--workdir={workdir}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), 'final checkpoint cannot be read')
  if 'Resuming at step 2 of 4' not in run.output:
    observed.problems.append('the MAE stage did not rerun from step 2')
  if checkpoint_steps(os.path.join(workdir, 'mae', 'checkpoints'))[-1:] != [4]:
    observed.lost.append('no readable final MAE checkpoint')
  return observed


def checkpoints_deleted(ctx: Context) -> Observed:
  workdir = ctx.trained_copy()
  checkpoints = os.path.join(workdir, 'checkpoints')
  for name in os.listdir(checkpoints):
    shutil.rmtree(os.path.join(checkpoints, name))
  return Observed(ctx.main(ctx.tiny(), f'--workdir={workdir}'), CARRY_ON, (EXIT_OK,),
                  'No checkpoint in .*; starting at step 0')


def finished_rerun(ctx: Context, *args: str) -> Observed:
  """The shared workdir, finished at its 4 steps, run again: nothing to do, nothing changed."""
  workdir = ctx.trained_copy()
  before = fingerprint(workdir)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}', f'--config.total_steps={BASE_TOTAL_STEPS}',
                 *args)
  return Observed(run, CARRY_ON, (EXIT_OK,), 'finished earlier',
                  lost=changes_between(before, fingerprint(workdir)))


def sigkill_then_rerun(ctx: Context) -> Observed:
  # The evidence is the rerun's: it takes over the lock the killed run left.
  return signalled(ctx, (signal.SIGKILL,), (-signal.SIGKILL,), 'Taking over .*no longer running',
                   resume=True)


def empty_lock_file(workdir: str) -> None:
  """The lock of a run killed while it was writing the file."""
  open(os.path.join(workdir, 'run.lock'), 'w').close()


def truncate_config_json(workdir: str) -> None:
  cut_in_half(os.path.join(workdir, 'config.json'))
