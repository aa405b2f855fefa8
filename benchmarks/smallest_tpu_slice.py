"""The paper-scale recipes, each compiled for the smallest Cloud TPU slice it fits on.

  python benchmarks/smallest_tpu_slice.py                      # every row, on v5p slices
  python benchmarks/smallest_tpu_slice.py --only=maws_2B,aim_7B --generation=v6e

Each row is a config of configs/ at the paper's size and global batch (MAWS's MAE and
WSP stages at ViT-L/16, H/14, 2B/14 and 6.5B/14, FLIP's masked stage at L/16 and batch
32k, AIM's 600M to 7B trunks). Its stages are compiled, with the code main.py
--compile_for runs (big_pretrain/compile_for.py: model.remat and scan chosen by
the chip's memory), for the generation's slices from the smallest up, doubling, until
one fits; a slice whose chips cannot hold the parameters and optimizer state costs no
compile. It needs the TPU compiler (`make install-tpu-compile`) and nothing else: no
TPU, no data (stand-ins of typical size for what the data decides, as the table says).

Prints one table: row, stage, model, global batch, the smallest slice that fits, its
mesh, remat and layout chosen, the compiler's peak HBM per chip and the sum of every buffer
against the chip's, the model FLOPs per step, the lower bound on the step's time read from
the compiled program (train/roofline.py) with the MFU it allows and the term it is made of
most, and the compile time.

Each compile's report is kept in --results (one JSON file per generation) as soon as it
is done, so a run that is stopped goes on where it stopped, and a rerun only prints;
--fresh compiles everything again.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import pathlib
import runpy
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host compiles; it runs nothing

from absl import logging  # noqa: E402

from big_pretrain import accelerators, tpu_slices  # noqa: E402
from big_pretrain import compile_for  # noqa: E402

# row -> (config file, its argument, the stages compiled)
ROWS = {
    'maws_L': ('configs/maws.py', None, ('mae', 'wsp')),
    'maws_H': ('configs/maws.py', 'H', ('mae', 'wsp')),
    'maws_2B': ('configs/maws.py', '2B', ('mae', 'wsp')),
    'maws_6.5B': ('configs/maws.py', '6.5B', ('mae', 'wsp')),
    'flip_L': ('configs/flip.py', None, ('pretrain',)),
    'aim_600M': ('configs/aim.py', None, ('main',)),
    'aim_1B': ('configs/aim.py', '1B', ('main',)),
    'aim_3B': ('configs/aim.py', '3B', ('main',)),
    'aim_7B': ('configs/aim.py', '7B', ('main',)),
}
MAX_CHIPS = 4096


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help=f'comma-separated rows of {list(ROWS)}')
  parser.add_argument('--generation', default='v5p',
                      choices=sorted(generation.name for generation in
                                     accelerators.tpu_generations()))
  parser.add_argument('--results', default='',
                      help='the JSON file of compiles done (default: '
                           'benchmarks/smallest_tpu_slice_GENERATION.json)')
  parser.add_argument('--fresh', action='store_true', help='compile again what --results has')
  parser.add_argument('--bound_only', action='store_true',
                      help="compile again, with the remat and layout it chose, only the "
                           'smallest slice each row fitted where its report predates the '
                           "step's lower bound; search nothing")
  parser.add_argument('--print_only', action='store_true',
                      help='print the table of what --results holds; compile nothing (a row '
                           'not found in it reads "not compiled yet")')
  return parser.parse_args()


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


class Results:
  """The compiles done, one report per row/stage/slice, written after each one."""

  def __init__(self, path: str, fresh: bool):
    self.path = path
    self.records = {}
    if not fresh and os.path.exists(path):
      with open(path) as f:
        self.records = json.load(f)['compiles']

  def get(self, key: str):
    record = self.records.get(key)
    if record is None:
      return None
    known = {field.name for field in dataclasses.fields(compile_for.StageReport)}
    # A report from before a field was added, or with one since removed (XLA's estimate).
    return compile_for.StageReport(**{key: value for key, value in record['report'].items()
                                        if key in known})

  def put(self, key: str, report: compile_for.StageReport):
    import jax
    import libtpu  # pylint: disable=import-outside-toplevel
    self.records[key] = {
        'report': dataclasses.asdict(report),
        'compiled_on': f'{datetime.date.today()}, {cpu_name()}, '
                       f'{os.cpu_count()} cores, jax {jax.__version__}, '
                       f'libtpu {getattr(libtpu, "__version__", "?")}'}
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path + '.tmp', 'w') as f:
      json.dump({'compiles': self.records}, f, indent=1, default=str)
    os.replace(self.path + '.tmp', self.path)


def smallest_fit(row: str, stage: str, config, generation, stand_ins: str, results: Results,
                 print_only: bool = False):
  """(the report of the smallest slice that fits, or of the last tried; the slices tried)."""
  tried, report = [], None
  for name in tpu_slices.slice_names(generation, max_chips=MAX_CHIPS):
    tpu_slice = tpu_slices.parse_slice(name)
    key = f'{row}/{stage}/{name}'
    report = results.get(key)
    if report is None and print_only:
      return report, None
    if report is None:
      try:
        devices = tpu_slices.topology_devices(tpu_slice)
        report = compile_for.check_stage(stage, config, f'config.stages.{stage}', tpu_slice,
                                           devices, stand_ins, find_fix=False,
                                           with_evaluators=False)
      except ValueError as error:  # the batch no longer splits over the slice's chips
        print(f'{row}/{stage}: stopped at {name}: {error}', flush=True)
        break
      results.put(key, report)
    tried.append(name)
    print(f'{row}/{stage}: {name}: {"fits" if report.fits else "does not fit"} '
          f'({compile_for.describe_bytes(report.peak_bytes)} per chip, '
          f'{report.compile_seconds:.0f} s)', flush=True)
    if report.fits:
      return report, name
  return report, None


def recompile_fit(row: str, stage: str, config, generation, stand_ins: str, results: Results):
  """(the smallest fitting slice's report, with the bound; its name): that slice compiled
  again with the remat and layout chosen then, if its report has no bound yet."""
  for name in tpu_slices.slice_names(generation, max_chips=MAX_CHIPS):
    key = f'{row}/{stage}/{name}'
    report = results.get(key)
    if report is None:
      return None, None
    if not report.fits:
      continue
    if not report.step_seconds_at_least:
      fixed = config.copy_and_resolve_references()
      with fixed.ignore_type():  # model.scan may be 'auto' (a string) in the config
        fixed.model.remat, fixed.model.scan = report.remat, report.layout == 'scanned'
      tpu_slice = tpu_slices.parse_slice(name)
      report = compile_for.check_stage(stage, fixed, f'config.stages.{stage}', tpu_slice,
                                         tpu_slices.topology_devices(tpu_slice), stand_ins,
                                         find_fix=False, with_evaluators=False)
      results.put(key, report)
      print(f'{row}/{stage}: {name} compiled again: step >= '
            f'{compile_for.describe_seconds(report.step_seconds_at_least)} '
            f'({report.compile_seconds:.0f} s)', flush=True)
    return report, name
  return None, None


def _bound(report) -> tuple[str, str, str]:
  """The step's lower bound from the compiled program, the MFU it allows and its dominant
  term; '?' for a report compiled before the bound existed (recompile with --fresh)."""
  if not report.step_seconds_at_least:
    return '?', '?', '?'
  return (compile_for.describe_seconds(report.step_seconds_at_least),
          f'{report.mfu_at_most:.0%}' if report.mfu_at_most else '?', report.bound_by or '?')


def main():
  args = parse_args()
  logging.set_verbosity(logging.INFO)  # which remat and slice each compile tries
  generation = accelerators.ACCELERATORS[args.generation]
  rows = [r for r in args.only.split(',') if r] or list(ROWS)
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    sys.exit(f'Unknown rows {unknown}: choose from {list(ROWS)}.')
  results = Results(args.results or str(REPO / f'benchmarks/smallest_tpu_slice_{args.generation}.json'),
                    args.fresh)
  found = []
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as stand_ins:
    for row in rows:
      path, arg, stages = ROWS[row]
      config = runpy.run_path(str(REPO / path))['get_config'](arg)
      for stage in stages:
        stage_config = config.stages[stage] if 'stages' in config else config
        if args.bound_only:
          report, name = recompile_fit(row, stage, stage_config, generation, stand_ins, results)
        else:
          report, name = smallest_fit(row, stage, stage_config, generation, stand_ins, results,
                                      args.print_only)
        found.append((row, stage, report, name))
  header = ('row', 'stage', 'model', 'batch', 'smallest slice', 'mesh', 'remat', 'layout',
            'peak/chip', 'sum', 'of', 'model FLOP/step', 'step >=', 'MFU <=', 'bound by',
            'compile')
  lines = [header]
  for row, stage, r, name in found:
    if r is None:
      lines.append((row, stage, '', '', 'not compiled yet') + ('',) * (len(header) - 5))
      continue
    lines.append((
        row, r.stage, f'{r.kind} {r.variant}', f'{r.batch_size:,}', name or 'none',
        compile_for.describe_mesh(r.mesh) if name else '', r.remat if name else '',
        r.layout if name else '', compile_for.describe_bytes(r.peak_bytes),
        compile_for.describe_bytes(r.summed_bytes),
        compile_for.describe_bytes(r.capacity_bytes),
        compile_for.describe_count(r.analytic_flops),
        *_bound(r), f'{r.compile_seconds:.0f} s'))
  compile_seconds = sum(r['report']['compile_seconds'] for r in results.records.values())
  print(f'\nThe smallest {args.generation} slice each fits on ({compile_seconds:.0f} s of compiling '
        f'in all, {time.perf_counter() - started:.0f} s in this run; a fit: peak <= '
        f'{compile_for.MEMORY_FRACTION:.0%} of a chip):')
  print('| ' + ' | '.join(str(v) for v in header) + ' |')
  print('|' + '|'.join('---' for _ in header) + '|')
  for line in lines[1:]:
    print('| ' + ' | '.join(str(v) for v in line) + ' |')
  compiled_on = sorted({results.records[k]['compiled_on'] for k in results.records})
  print(f'Compiled on: {" / ".join(compiled_on)}.')
  stand_in_notes = sorted({note for _, _, r, _ in found if r for note in r.stand_ins})
  if stand_in_notes:
    print(f'Stand-ins for what the data decides: {"; ".join(stand_in_notes)}.')


if __name__ == '__main__':
  main()
