"""Bad inputs and faults against the project's commands: does each end in a clear message or
graceful handling?

Runs each case of the bad-input table (reliability/bad_input_cases.py; a row that lists
several cases is split into one case each), and a few more a user would meet, against the
real `main.py` (and `python -m big_pretrain.export`, `.data.convert`,
`.data.text.build_vocabulary`) as a subprocess with a tiny MAE config (written into a
temporary folder), and prints one markdown table:

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
  clear one-line message   refused with exactly one `main.py: ...` line (the command's own:
                        `big_pretrain.export: ...`)
  graceful handling     carried on (or saved and stopped) as documented

  python reliability/bad_inputs.py                 # about 12 min on 2 CPU cores
  python reliability/bad_inputs.py --only=lr,sigint --keep

Cases that need a trained workdir (or its timm or Hugging Face export) share one (made once,
copied per case).
Compilations are shared through a JAX compilation cache in the temporary
folder. A full disk is a small tmpfs mounted for the case (needs root and a
kernel that allows it; otherwise the case says "not run here").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time

# Run from anywhere: the reliability and big_pretrain packages live at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# This harness reads checkpoints to damage them; it needs no accelerator (and looks for none).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=wrong-import-position
from reliability.bad_input_cases import Case, cases
from reliability.bad_input_checks import (BASE_TOTAL_STEPS, EXIT_OK, REFUSE, Context, Observed)
from reliability.fourth_ring_checks import EXPORT, HF_EXPORT, TIMM_EXPORT
from reliability.processes import Run

LOOP_LOG_LINES = 3000    # a run that loops on a bad input writes tens of thousands of warnings
OUTCOME_CHARS = 100

# The tiny configs every case runs: seconds per run on a CPU.
TINY_CONFIG = '''\
"""Tiny configs for reliability/bad_inputs.py: width 64, 2 blocks, 32 px, batch 16."""

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


# --- Judging what a case saw.


TRACEBACK_MARK = 'Traceback (most recent call last)'


def verdict(observed: Observed) -> str:
  """The worst thing that happened, in the words of the table in docs/reliability.md."""
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
    messages = message_lines(run.output, observed.program)
    if len(messages) != 1:
      return f'UNCLEAR ({len(messages)} {observed.program} lines)'
    return 'clear one-line message'
  return 'graceful handling'


BAD_VERDICTS = ('HANG', 'TRACEBACK', 'LOOP', 'SILENT MIX', 'data lost', 'UNEXPECTED', 'UNCLEAR')

_ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ')


def message_lines(output: str, program: str = 'main.py') -> list[str]:
  """The command's own one-line messages: those that start with '<program>: '."""
  return [line.strip() for line in output.splitlines() if line.startswith(f'{program}: ')]


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
  messages = message_lines(output, observed.program)
  line = messages[-1] if messages else ''
  if not line and observed.evidence:
    line = next((_ABSL_PREFIX.sub('', l).strip()
                 for l in (output + shortened(observed.extra_output)).splitlines()
                 if re.search(observed.evidence, l)), '')
  if not line:
    line = next((l.strip() for l in reversed(output.splitlines()) if l.strip()), '')
  line = _ABSL_PREFIX.sub('', line)
  return line if len(line) <= OUTCOME_CHARS else line[:OUTCOME_CHARS - 1] + '…'

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


# The shared exports of the trained tiny MAE, by fixture name: their format.
EXPORT_FIXTURES = {TIMM_EXPORT: 'timm', HF_EXPORT: 'hf'}


def train_fixture(ctx: Context, name: str) -> Run:
  """The shared trained workdirs: the tiny MAE stopped at 4 of 6 steps, the finished chain;
  and the shared exports of the first (made once it is trained)."""
  workdir = ctx.fixture(name)
  if name in EXPORT_FIXTURES:
    return ctx.command(EXPORT, ctx.fixture('trained'), f'--format={EXPORT_FIXTURES[name]}',
                       f'--output={workdir}')
  if name == 'trained':
    return ctx.main(ctx.tiny(), f'--workdir={workdir}', f'--config.total_steps={BASE_TOTAL_STEPS}')
  return ctx.main(ctx.tiny('chain'), f'--workdir={workdir}')


def make_fixtures(setup: Context, selected: list[Case], pool) -> None:
  """Trains (then exports) the shared fixtures the selected cases need; exits if one fails."""
  needed = {case.needs for case in selected if case.needs}
  exports = sorted(needed & set(EXPORT_FIXTURES))
  trained = sorted((needed - set(EXPORT_FIXTURES)) | ({'trained'} if exports else set()))
  for names in (trained, exports):  # the exports read the trained workdir
    for name, run in zip(names, pool.map(lambda name: train_fixture(setup, name), names)):
      if run.rc != EXIT_OK:
        sys.exit(f'Making the shared fixture {name!r} failed (exit {run.rc}):\n'
                 + textwrap.indent(run.output[-3000:], '  '))


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
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
      make_fixtures(setup, selected, pool)
      print(f'Shared fixtures made in {time.monotonic() - started:.0f} s.', file=sys.stderr)
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
