"""Bad inputs and faults against main.py: does every one end in a clear message or graceful handling?

Runs each case of issue 16's table (a row that lists several cases is split
into one case each), and a few more a user would meet, against the real
`main.py` as a subprocess with a tiny MAE config (written into a temporary
folder), and prints one markdown table:

  case | what was done | exit code | outcome | verdict

The outcome is main.py's final one-line message on stderr (or, for a run that
carries on, the log line that shows how it handled the fault). The verdict is
computed from what happened, not written down per case:

  HANG (timeout)        the case ran past its time limit (`--case_timeout`)
  TRACEBACK             a Python traceback reached the output
  LOOP                  more than LOOP_LOG_LINES lines of log
  SILENT MIX            exit 0 where the input should have been refused
  data lost             a checkpoint, the recorded config or the saved steps
                        are gone or changed where nothing should have been
  UNEXPECTED            another exit code or a missing piece of evidence
  clear one-line message   refused with exactly one `main.py: ...` line
  graceful handling     carried on (or saved and stopped) as documented

  python benchmarks/bad_inputs.py                 # about 4-6 min on 2 CPU cores
  python benchmarks/bad_inputs.py --only=lr,sigint --keep

Cases that need a trained workdir share one (trained once, copied per case).
Compilations are shared through a JAX compilation cache in the temporary
folder. A full disk is a small tmpfs mounted for the case (needs root and a
kernel that allows it; otherwise the case says "not run here").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable

# Run from anywhere: main.py lives at the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'main.py')

EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
LOOP_LOG_LINES = 3000    # the issue's looping run wrote 83,000 warnings
OUTCOME_CHARS = 100
POLL_SECONDS = 0.05
BASE_TOTAL_STEPS = 4     # the shared workdir stops here; the config says 6 (an allowed change)

# Issue 16's table: row id -> (the row, as filed; the case names that cover it).
ISSUE_ROWS = {
    'identity': ('restart in the same workdir with lr, mask ratio, batch size, seed or data '
                 'source changed', ('lr', 'mask_ratio', 'batch_size', 'seed', 'data_source')),
    'width': ('restart with a different model width', ('model_width',)),
    'metadata': ('checkpoints/<latest>/state/_METADATA missing', ('metadata_missing',)),
    'unreadable': ('every image in the folder unreadable', ('all_unreadable',)),
    'held_out': ('held-out folder smaller than an evaluator\'s batch', ('held_out_7_of_8',)),
    'mask_range': ('objective.mask_ratio=1.0 or 1.5 for MAE', ('mask_ratio_1.0',
                                                                'mask_ratio_1.5')),
    'one_line': ('--config.total_steps=abc, missing config file, a config that raises, :dmeo, '
                 'no --workdir, workdir is a file, read-only workdir, image size not a multiple '
                 'of the patch',
                 ('total_steps_abc', 'missing_config', 'config_raises', 'dmeo', 'no_workdir',
                  'workdir_is_file', 'read_only_workdir', 'image_size_30')),
    'late': ('batch not divisible by the devices; data path missing or empty',
             ('batch_vs_devices', 'data_path_missing', 'data_path_empty')),
    'two_runs': ('two runs started into one workdir', ('two_runs',)),
    'disk_full': ('disk full during a save', ('disk_full',)),
    'chain': ('an earlier stage\'s final checkpoint unreadable in a chain', ('chain_unreadable',)),
    'signals': ('SIGINT (Ctrl-C); SIGTERM', ('sigint', 'sigterm')),
    'deleted': ('all checkpoints deleted, folder kept', ('checkpoints_deleted',)),
}

# The tiny configs every case runs: seconds per run on a CPU.
TINY_CONFIG = '''\
"""Tiny configs for benchmarks/bad_inputs.py: width 64, 2 blocks, 32 px, batch 16."""

from big_pretrain.config.defaults import chain_config, stage_config
from big_pretrain.data.text.labels import synthetic_vocabulary_path
from big_pretrain.evaluators import evaluator_config


def _tiny(objective):
  config = stage_config(objective)
  config.model.variant = 'mu/8'
  config.batch_size = 16
  config.total_steps = 6
  config.optim.update(lr_per_256=1e-3, warmup_steps=2)
  config.data.update(source='synthetic', num_examples=256, source_image_size=32, image_size=32,
                     num_threads=2)
  config.checkpoint.every_steps = 2
  config.log.every_steps = 2
  return config


def _tiny_mae():
  config = _tiny('mae')
  config.objective.update(decoder_width=32, decoder_depth=1, decoder_heads=4)
  return config


def get_config(arg=None):
  if arg == 'recon':  # the reconstruction grid of 8 held-out images at the final step
    config = _tiny_mae()
    config.evals.reconstruction = evaluator_config('reconstruction', num_images=8)
    return config
  if arg == 'chain':  # MAE, then WSP from its encoder
    wsp = _tiny('wsp')
    wsp.data.labels.vocabulary = synthetic_vocabulary_path()
    wsp.init_from.update(stage='mae', take=('encoder',))
    config = chain_config(mae=_tiny_mae(), wsp=wsp)
    config.stages.mae.total_steps = wsp.total_steps = 4
    return config
  return _tiny_mae()
'''


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default='', help='comma-separated case names (default: all)')
  parser.add_argument('--workers', type=int, default=2, help='cases run at once')
  parser.add_argument('--case_timeout', type=float, default=150,
                      help='seconds one main.py run may take before it counts as a hang')
  parser.add_argument('--keep', action='store_true', help='keep the temporary folder')
  return parser.parse_args()


# --- Running main.py.


@dataclasses.dataclass
class Run:
  """One finished (or stopped) main.py process."""
  args: list[str]
  rc: int | None        # None: still running at its time limit, then killed
  output: str           # stderr, then stdout
  seconds: float

  @property
  def timed_out(self) -> bool:
    return self.rc is None


class Process:
  """main.py started in its own process group, so a hang can be killed whole."""

  def __init__(self, args: list[str], env: dict[str, str], log_path: str):
    self.args = args
    self._log_path = log_path
    self._log = open(log_path, 'w')
    self._started = time.monotonic()
    self.popen = subprocess.Popen([sys.executable, MAIN, *args], cwd=REPO, env=env,
                                  stdout=self._log, stderr=subprocess.STDOUT,
                                  start_new_session=True)

  def signal(self, signum: int) -> None:
    # To the whole group, as a terminal's Ctrl-C or a scheduler's notice reaches it.
    os.killpg(self.popen.pid, signum)

  def wait(self, timeout: float) -> Run:
    try:
      rc = self.popen.wait(timeout=max(timeout - (time.monotonic() - self._started), 1))
    except subprocess.TimeoutExpired:
      self.signal(signal.SIGKILL)
      self.popen.wait()
      rc = None
    self._log.close()
    with open(self._log_path, errors='replace') as log:
      return Run(self.args, rc, log.read(), time.monotonic() - self._started)


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

  def start(self, *args: str, devices: int = 1) -> Process:
    self._runs += 1
    env = _main_env(devices)
    env['JAX_COMPILATION_CACHE_DIR'] = self.cache
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    return Process(list(args), env, os.path.join(self.folder, f'run{self._runs}.log'))

  def main(self, *args: str, devices: int = 1) -> Run:
    return self.start(*args, devices=devices).wait(self.timeout)

  def tiny(self, variant: str = '') -> str:
    return f'--config={self.config}' + (f':{variant}' if variant else '')

  def fixture(self, name: str) -> str:
    return os.path.join(self.fixtures, name)

  def trained_copy(self, base: str = 'trained') -> str:
    """A copy of a shared trained workdir that this case may change."""
    workdir = os.path.join(self.folder, 'run')
    shutil.copytree(self.fixture(base), workdir)
    return workdir


# --- What a case found, and its verdict.

REFUSE = 'refuse'      # a non-zero exit with one clear line; nothing in the workdir changed
CARRY_ON = 'carry on'  # handled: finished, or saved and stopped as documented


@dataclasses.dataclass
class Observed:
  """What one case saw; `verdict` judges it."""
  run: Run | None                 # None: not run here
  expect: str                     # REFUSE or CARRY_ON
  exit_codes: tuple[int, ...]     # the documented exit codes for this case
  evidence: str = ''              # a regex the output must match (the message or log line)
  lost: list[str] = dataclasses.field(default_factory=list)      # what was lost or changed
  problems: list[str] = dataclasses.field(default_factory=list)  # a follow-up that failed
  extra_output: str = ''          # other runs of the case (checked for tracebacks too)
  not_run: str = ''               # why the case could not run on this machine


TRACEBACK_MARK = 'Traceback (most recent call last)'


def verdict(observed: Observed) -> str:
  """The worst thing that happened, in the words of the README's table."""
  if observed.not_run:
    return f'not run here: {observed.not_run}'
  run = observed.run
  if run.timed_out:
    return f'HANG (timeout {run.seconds:.0f} s)'
  output = run.output + observed.extra_output
  if TRACEBACK_MARK in output:
    return 'TRACEBACK'
  if output.count('\n') > LOOP_LOG_LINES:
    return f'LOOP ({output.count(chr(10))} log lines)'
  if observed.expect == REFUSE and run.rc == EXIT_OK:
    return 'SILENT MIX'
  if observed.lost:
    return 'data lost: ' + '; '.join(observed.lost)
  if run.rc not in observed.exit_codes:
    return f'UNEXPECTED (exit {run.rc}, documented {observed.exit_codes})'
  if observed.problems:
    return 'UNEXPECTED: ' + '; '.join(observed.problems)
  if observed.evidence and not re.search(observed.evidence, output):
    return f'UNEXPECTED (no {observed.evidence!r} in the output)'
  if observed.expect == REFUSE:
    messages = main_py_lines(run.output)
    if len(messages) != 1:
      return f'UNCLEAR ({len(messages)} main.py lines)'
    return 'clear one-line message'
  return 'graceful handling'


BAD_VERDICTS = ('HANG', 'TRACEBACK', 'LOOP', 'SILENT MIX', 'data lost', 'UNEXPECTED', 'UNCLEAR')

_ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ')


def main_py_lines(output: str) -> list[str]:
  return [line.strip() for line in output.splitlines() if line.startswith('main.py: ')]


def outcome(observed: Observed, case_folder: str = '', root: str = '') -> str:
  """main.py's final message, else the first log line (of any of the case's runs) that
  matches the evidence; paths shortened so the 100 characters say something."""
  if observed.not_run or observed.run is None:
    return '-'

  def shortened(text: str) -> str:
    if case_folder:
      text = text.replace(case_folder + os.sep, '')
    return text.replace(root, '$TMP') if root else text

  output = shortened(observed.run.output)
  messages = main_py_lines(output)
  line = messages[-1] if messages else ''
  if not line and observed.evidence:
    line = next((_ABSL_PREFIX.sub('', l).strip()
                 for l in (output + shortened(observed.extra_output)).splitlines()
                 if re.search(observed.evidence, l)), '')
  if not line:
    line = next((l.strip() for l in reversed(output.splitlines()) if l.strip()), '')
  line = _ABSL_PREFIX.sub('', line)
  return line if len(line) <= OUTCOME_CHARS else line[:OUTCOME_CHARS - 1] + '…'


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


def wait_for_checkpoint(process: Process, checkpoint_dir: str, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.popen.poll() is None:
    if checkpoint_steps(checkpoint_dir):
      return True
    time.sleep(POLL_SECONDS)
  return False


# --- The cases.


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  row: str           # an ISSUE_ROWS id, or 'added'
  done: str          # what was done, for the table
  check: Callable[[Context], Observed]
  needs: str = ''    # a shared fixture it copies: 'trained' or 'chain'


def refused_unchanged(ctx: Context, *args: str, evidence: str, devices: int = 1,
                      exit_codes=(EXIT_STOPPED, EXIT_USAGE)) -> Observed:
  """A restart of a copy of the trained workdir that must be refused, with nothing changed."""
  workdir = ctx.trained_copy()
  before = fingerprint(workdir)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}', *args, devices=devices)
  return Observed(run, REFUSE, exit_codes, evidence, lost=changes_between(before, fingerprint(workdir)))


def refused_at_start(ctx: Context, *args: str, evidence: str, devices: int = 1) -> Observed:
  """A fresh run that must be refused before anything is written."""
  run = ctx.main(*args, devices=devices)
  observed = Observed(run, REFUSE, (EXIT_USAGE,), evidence)
  workdir = os.path.join(ctx.folder, 'fresh')
  if os.path.exists(workdir):
    observed.problems.append(f'{workdir} was written')
  return observed


def _fresh(ctx: Context) -> str:
  return f'--workdir={os.path.join(ctx.folder, "fresh")}'


def _identity_case(name: str, override: str, diff: str) -> Case:
  return Case(name, 'identity', f'resume the 4-step workdir (total_steps 4 -> 6) with `{override}`',
              lambda ctx: refused_unchanged(ctx, *override.split(), evidence=re.escape(diff)),
              needs='trained')


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


def _remove_metadata(checkpoint: str) -> None:
  os.remove(os.path.join(checkpoint, 'state', '_METADATA'))


def _remove_arrays(checkpoint: str) -> None:
  for root, _, files in os.walk(os.path.join(checkpoint, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        os.remove(os.path.join(root, name))


def _truncate_largest(checkpoint: str) -> None:
  files = [os.path.join(root, name) for root, _, names in os.walk(checkpoint) for name in names]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def image_folder_run(ctx: Context, train: str, *, expect: str, exit_codes, evidence: str,
                     variant: str = '', test: str = '') -> Observed:
  args = [ctx.tiny(variant), _fresh(ctx), '--config.data.source=image_folder',
          f'--config.data.path={ctx.fixture(train)}']
  if test:
    args.append(f'--config.data.test_path={ctx.fixture(test)}')
  return Observed(ctx.main(*args), expect, exit_codes, evidence)


def held_out_smaller_than_batch(ctx: Context) -> Observed:
  observed = image_folder_run(ctx, 'good_images', expect=CARRY_ON, exit_codes=(EXIT_OK,),
                              evidence='held-out split has 7 images', variant='recon',
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
  with tmpfs(os.path.join(ctx.folder, 'read_only'), 'ro,size=1m') as mount_point:
    if mount_point is None:
      return Observed(None, REFUSE, (EXIT_USAGE,), not_run='mounting a read-only tmpfs failed')
    return refused_at_start(ctx, ctx.tiny(), f'--workdir={mount_point}/run',
                            evidence='not writable')


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
  runs = [first.wait(ctx.timeout), second.wait(ctx.timeout)]
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
    return Observed(process.wait(ctx.timeout), CARRY_ON, exit_codes, evidence,
                    problems=['no checkpoint before the run ended'])
  saved_before = checkpoint_steps(os.path.join(workdir, 'checkpoints'))
  for signum in signals:
    process.signal(signum)
    time.sleep(0.02)
  observed = Observed(process.wait(ctx.timeout), CARRY_ON, exit_codes, evidence)
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
      return Observed(process.wait(ctx.timeout), REFUSE, (EXIT_STOPPED,),
                      problems=['no checkpoint before the run ended'])
    filler = os.path.join(mount_point, 'filler')
    _fill(filler)
    observed = Observed(process.wait(ctx.timeout), REFUSE, (EXIT_STOPPED,),
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
  _remove_metadata(os.path.join(workdir, 'mae', 'checkpoints', '4'))
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


def empty_lock_file(ctx: Context) -> Observed:
  workdir = ctx.trained_copy()
  open(os.path.join(workdir, 'run.lock'), 'w').close()
  before = fingerprint(workdir)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}')
  return Observed(run, REFUSE, (EXIT_USAGE,), 'lock file that names no run',
                  lost=changes_between(before, fingerprint(workdir)))


def damaged_config_json(ctx: Context) -> Observed:
  workdir = ctx.trained_copy()
  path = os.path.join(workdir, 'config.json')
  os.truncate(path, os.path.getsize(path) // 2)
  before = fingerprint(workdir)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}')
  return Observed(run, REFUSE, (EXIT_STOPPED, EXIT_USAGE), 'config.json cannot be read',
                  lost=changes_between(before, fingerprint(workdir)))


def _case(name, row, done, check, needs=''):
  return Case(name, row, done, check, needs)


def cases() -> list[Case]:
  """Every case, in the order of the issue's table; added ones after their row."""
  bad_images = ['--config.data.source=image_folder']
  return [
      _identity_case('lr', '--config.optim.lr_per_256=2e-3', 'optim.lr_per_256: 0.001 -> 0.002'),
      _identity_case('mask_ratio', '--config.objective.mask_ratio=0.5',
                     'objective.mask_ratio: 0.75 -> 0.5'),
      _identity_case('batch_size', '--config.batch_size=32', 'batch_size: 16 -> 32'),
      _identity_case('seed', '--config.seed=1', 'seed: 0 -> 1'),
      Case('data_source', 'identity', 'resume the 4-step workdir with `--config.data.source='
           'image_folder --config.data.path=<16 PNGs>`',
           lambda ctx: refused_unchanged(
               ctx, *bad_images, f'--config.data.path={ctx.fixture("good_images")}',
               evidence=re.escape('data.source: "synthetic" -> "image_folder"')),
           needs='trained'),
      _case('resume_with_changes', 'added', 'the `lr` case with `--config.resume_with_changes='
            'True`', lambda ctx: resume_allowed(
                ctx, '--config.optim.lr_per_256=2e-3', '--config.resume_with_changes=True',
                evidence='resume_with_changes=True allows'), needs='trained'),
      _case('longer_schedule', 'added', 'resume the 4-step workdir with total_steps 6 only',
            lambda ctx: resume_allowed(ctx, evidence='Resuming with changed keys'),
            needs='trained'),
      _case('model_width', 'width', 'resume the 4-step workdir with `--config.model.variant=Ti/8`'
            ' (width 192)', lambda ctx: refused_unchanged(
                ctx, '--config.model.variant=Ti/8', evidence=re.escape(
                    'model.variant: "mu/8" -> "Ti/8"')), needs='trained'),
      _case('metadata_missing', 'metadata', 'delete checkpoints/4/state/_METADATA, rerun',
            lambda ctx: unreadable_checkpoint(ctx, _remove_metadata, '_METADATA is missing'),
            needs='trained'),
      _case('arrays_missing', 'added', 'delete the array files of checkpoints/4, rerun',
            lambda ctx: unreadable_checkpoint(ctx, _remove_arrays, 'cannot be read'),
            needs='trained'),
      _case('truncated_file', 'added', 'truncate the largest file of checkpoints/4 to half, rerun',
            lambda ctx: unreadable_checkpoint(ctx, _truncate_largest, 'cannot be read'),
            needs='trained'),
      _case('all_unreadable', 'unreadable', 'train on a folder of 8 garbage .jpg files only',
            lambda ctx: image_folder_run(ctx, 'garbage_images', expect=REFUSE,
                                         exit_codes=(EXIT_STOPPED,),
                                         evidence='max_consecutive_unreadable')),
      _case('half_unreadable', 'added', 'train on 16 PNGs and 8 garbage .jpg files',
            lambda ctx: image_folder_run(ctx, 'half_garbage', expect=CARRY_ON,
                                         exit_codes=(EXIT_OK,),
                                         evidence='Skipping unreadable image')),
      _case('held_out_7_of_8', 'held_out', 'reconstruction of 8 images, held-out folder of 7; '
            'then the same command again', held_out_smaller_than_batch),
      _case('mask_ratio_1.0', 'mask_range', '`--config.objective.mask_ratio=1.0`',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx),
                                         '--config.objective.mask_ratio=1.0',
                                         evidence=re.escape('must be in [0, 1)'))),
      _case('mask_ratio_1.5', 'mask_range', '`--config.objective.mask_ratio=1.5`',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx),
                                         '--config.objective.mask_ratio=1.5',
                                         evidence=re.escape('must be in [0, 1)'))),
      _case('mask_ratio_0.99', 'added', '`--config.objective.mask_ratio=0.99` (16 patches)',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx),
                                         '--config.objective.mask_ratio=0.99',
                                         evidence='keeps 0 of the 16 patches visible')),
      _case('total_steps_abc', 'one_line', '`--config.total_steps=abc`',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx), '--config.total_steps=abc',
                                         evidence='invalid literal')),
      _case('missing_config', 'one_line', '`--config=configs/nope.py`',
            lambda ctx: refused_at_start(ctx, '--config=configs/nope.py', _fresh(ctx),
                                         evidence='no such file')),
      _case('config_raises', 'one_line', 'a config file whose get_config raises ValueError',
            lambda ctx: refused_at_start(ctx, f'--config={ctx.fixture("raising.py")}',
                                         _fresh(ctx), evidence='ValueError: no such recipe')),
      _case('dmeo', 'one_line', '`--config=configs/mae.py:dmeo`',
            lambda ctx: refused_at_start(ctx, '--config=configs/mae.py:dmeo', _fresh(ctx),
                                         evidence="unknown variant 'dmeo'")),
      _case('no_workdir', 'one_line', 'no `--workdir`',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), evidence='--workdir=DIR is required')),
      _case('no_config', 'added', 'no `--config`',
            lambda ctx: refused_at_start(ctx, _fresh(ctx), evidence='--config=.* is required')),
      _case('unknown_key', 'added', '`--config.optim.lr=1` (no such key)',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx), '--config.optim.lr=1',
                                         evidence='lr_per_256')),
      _case('workdir_is_file', 'one_line', '`--workdir=` an existing file',
            lambda ctx: refused_at_start(ctx, ctx.tiny(),
                                         f'--workdir={ctx.fixture("raising.py")}',
                                         evidence='is a file, not a folder')),
      _case('read_only_workdir', 'one_line', '`--workdir=` inside a read-only tmpfs mount',
            read_only_workdir),
      _case('image_size_30', 'one_line', '`--config.data.image_size=30` (patch 8)',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx),
                                         '--config.data.image_size=30',
                                         evidence='not a multiple of the patch size 8')),
      _case('batch_vs_devices', 'late', '`--config.batch_size=12` on 8 CPU devices',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx), '--config.batch_size=12',
                                         evidence='multiple of the 8 devices', devices=8)),
      _case('data_path_missing', 'late', '`--config.data.path=` a folder that does not exist',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx), *bad_images,
                                         f'--config.data.path={ctx.fixture("nowhere")}',
                                         evidence='does not exist')),
      _case('data_path_empty', 'late', '`--config.data.path=` a class folder with no images',
            lambda ctx: refused_at_start(ctx, ctx.tiny(), _fresh(ctx), *bad_images,
                                         f'--config.data.path={ctx.fixture("no_images")}',
                                         evidence='No images found')),
      _case('two_runs', 'two_runs', 'start the same command twice at once into one new workdir',
            two_runs_at_once),
      _case('empty_lock', 'added', 'an empty run.lock in the workdir (a run killed while '
            'writing it)', empty_lock_file, needs='trained'),
      _case('disk_full', 'disk_full', 'workdir on a 64 MiB tmpfs, filled up after the first '
            'checkpoint; then freed and the same command rerun', disk_full),
      _case('chain_unreadable', 'chain', 'MAE -> WSP chain finished; delete '
            'mae/checkpoints/4/state/_METADATA, rerun', chain_unreadable, needs='chain'),
      _case('sigint', 'signals', 'SIGINT (Ctrl-C) after the first checkpoint; then the same '
            'command', lambda ctx: signalled(ctx, (signal.SIGINT,), (EXIT_PREEMPTED,),
                                             'Preempted', resume=True)),
      _case('sigterm', 'signals', 'SIGTERM after the first checkpoint',
            lambda ctx: signalled(ctx, (signal.SIGTERM,), (EXIT_PREEMPTED,), 'Preempted',
                                  resume=False)),
      _case('double_ctrl_c', 'added', 'two SIGINTs 20 ms apart after the first checkpoint',
            lambda ctx: signalled(ctx, (signal.SIGINT, signal.SIGINT),
                                  (EXIT_INTERRUPTED, EXIT_PREEMPTED), 'Interrupted|Preempted',
                                  resume=False)),
      _case('sigkill', 'added', 'SIGKILL after the first checkpoint; then the same command',
            sigkill_then_rerun),
      _case('checkpoints_deleted', 'deleted', 'delete everything in checkpoints/, keep the folder,'
            ' rerun', checkpoints_deleted, needs='trained'),
      _case('finished_rerun', 'added', 'rerun the finished 4-step workdir as it was',
            finished_rerun, needs='trained'),
      _case('damaged_config_json', 'added', 'truncate the workdir\'s config.json to half, rerun',
            damaged_config_json, needs='trained'),
  ]


# --- Shared fixtures: image folders, a raising config, the trained workdirs.


def write_fixtures(fixtures: str, config: str) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)

  def images(folder: str, readable: int, garbage: int, classes=('cats', 'dogs')):
    for class_name in classes:
      os.makedirs(os.path.join(fixtures, folder, class_name))
      for i in range(readable):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(fixtures, folder, class_name, f'{i}.png'))
      for i in range(garbage):
        with open(os.path.join(fixtures, folder, class_name, f'broken{i}.jpg'), 'wb') as f:
          f.write(rng.bytes(300))

  images('good_images', 8, 0)
  images('garbage_images', 0, 4)
  images('half_garbage', 8, 4)
  images('held_out_7', 7, 0, classes=('cats',))
  os.makedirs(os.path.join(fixtures, 'no_images', 'cats'))
  with open(os.path.join(fixtures, 'raising.py'), 'w') as f:
    f.write('def get_config(arg=None):\n  raise ValueError("no such recipe")\n')
  with open(config, 'w') as f:
    f.write(TINY_CONFIG)


def train_fixture(ctx: Context, name: str) -> Run:
  """The shared trained workdirs: the tiny MAE stopped at 4 of 6 steps, the finished chain."""
  workdir = ctx.fixture(name)
  if name == 'trained':
    return ctx.main(ctx.tiny(), f'--workdir={workdir}', f'--config.total_steps={BASE_TOTAL_STEPS}')
  return ctx.main(ctx.tiny('chain'), f'--workdir={workdir}')


def run_case(case: Case, root: str, args) -> tuple[Case, Observed]:
  folder = os.path.join(root, 'cases', case.name)
  os.makedirs(folder)
  ctx = Context(folder, os.path.join(root, 'tiny.py'), os.path.join(root, 'fixtures'),
                args.case_timeout, os.path.join(root, 'jax_cache'))
  try:
    return case, case.check(ctx)
  except Exception as error:  # pylint: disable=broad-except  (a bug here, reported in the row)
    empty = Run([], EXIT_OK, f'{TRACEBACK_MARK}: the benchmark itself raised {error!r}', 0)
    return case, Observed(empty, REFUSE, (), problems=[f'benchmark error {error!r}'])


def markdown_table(results: list[tuple[Case, Observed]], root: str = '') -> str:
  def cell(text) -> str:
    return str(text).replace('|', '\\|').replace('\n', ' ')

  lines = ['| case | what was done | exit code | outcome | verdict |', '|---|---|---|---|---|']
  for case, observed in results:
    rc = '-' if observed.run is None else ('timeout' if observed.run.timed_out else
                                           observed.run.rc)
    shown = outcome(observed, os.path.join(root, 'cases', case.name), root)
    lines.append(f'| {cell(case.name)} | {cell(case.done)} | {rc} | {cell(shown)} '
                 f'| {cell(verdict(observed))} |')
  return '\n'.join(lines)


def main():
  args = parse_args()
  selected = [case for case in cases() if not args.only or case.name in args.only.split(',')]
  started = time.monotonic()
  root = tempfile.mkdtemp(prefix='bad_inputs_')
  try:
    write_fixtures(os.path.join(root, 'fixtures'), os.path.join(root, 'tiny.py'))
    setup = Context(os.path.join(root, 'fixtures'), os.path.join(root, 'tiny.py'),
                    os.path.join(root, 'fixtures'), args.case_timeout,
                    os.path.join(root, 'jax_cache'))
    needed = sorted({case.needs for case in selected if case.needs})
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
      for name, run in zip(needed, pool.map(lambda name: train_fixture(setup, name), needed)):
        if run.rc != EXIT_OK:
          sys.exit(f'Training the shared workdir {name!r} failed (exit {run.rc}):\n'
                   + textwrap.indent(run.output[-3000:], '  '))
      print(f'Shared workdirs {needed} trained in {time.monotonic() - started:.0f} s.',
            file=sys.stderr)
      results = list(pool.map(lambda case: run_case(case, root, args), selected))
    print(markdown_table(results, root))
    bad = [case.name for case, observed in results if verdict(observed).startswith(BAD_VERDICTS)]
    print(f'\n{len(results)} cases in {time.monotonic() - started:.0f} s; '
          f'{len(bad)} not clear or graceful{": " + ", ".join(bad) if bad else ""}.')
    if args.keep:
      print(f'Kept {root}.', file=sys.stderr)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
