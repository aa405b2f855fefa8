"""The paper-scale recipes, each compiled for the smallest Cloud TPU slice it fits on.

  python benchmarks/smallest_tpu_slice.py                      # every row, on v5p slices
  python benchmarks/smallest_tpu_slice.py --only=maws_2B,aim_7B --generation=v6e

Each row is a config of configs/ at the paper's size and global batch (MAWS's MAE and
WSP stages at ViT-L/16, H/14, 2B/14 and 6.5B/14, FLIP's masked stage at L/16 and batch
32k, AIM's 600M to 7B trunks). Its stages are compiled, with the code main.py
--compile_for runs (big_pretrain/stages/compile_check.py: model.remat and scan chosen by
the chip's memory), for the generation's slices from the smallest up, doubling, until
one fits; a slice whose chips cannot hold the parameters and optimizer state costs no
compile. It needs the TPU compiler (`make install-tpu-compile`) and nothing else: no
TPU, no data (stand-ins of typical size for what the data decides, as the table says).

Prints one table: row, stage, model, global batch, the smallest slice that fits, its
mesh, remat and layout chosen, peak HBM per chip against the chip's, the model FLOPs
per step, XLA's estimated step time and the MFU it implies, and the compile time.
"""

import argparse
import os
import pathlib
import runpy
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # this host compiles; it runs nothing

from absl import logging  # noqa: E402

from big_pretrain import tpu_slices  # noqa: E402
from big_pretrain.stages import compile_check  # noqa: E402

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
  parser.add_argument('--generation', default='v5p', choices=sorted(tpu_slices.GENERATIONS))
  return parser.parse_args()


def slices(generation: tpu_slices.TpuGeneration):
  """The generation's slice names, smallest first."""
  chips = generation.min_chips
  while chips <= MAX_CHIPS:
    count = chips * 2 if generation.name_counts_cores else chips
    prefix = 'v5litepod' if generation.name == 'v5e' else generation.name
    yield f'{prefix}-{count}'
    chips *= 2


def smallest_fit(row: str, stage: str, config, generation, stand_ins: str):
  """(the report of the smallest slice that fits, or of the last tried; the slices tried)."""
  tried, report = [], None
  for name in slices(generation):
    tpu_slice = tpu_slices.parse_slice(name)
    try:
      devices = tpu_slices.topology_devices(tpu_slice)
      report = compile_check.check_stage(stage, config, f'config.stages.{stage}', tpu_slice,
                                         devices, stand_ins, find_fix=False,
                                         with_evaluators=False)
    except ValueError as error:  # the batch no longer splits over the slice's chips
      print(f'{row}/{stage}: stopped at {name}: {error}', flush=True)
      break
    tried.append(name)
    print(f'{row}/{stage}: {name}: {"fits" if report.fits else "does not fit"} '
          f'({compile_check.describe_bytes(report.peak_bytes)} per chip, '
          f'{report.compile_seconds:.0f} s)', flush=True)
    if report.fits:
      return report, name
  return report, None


def main():
  args = parse_args()
  logging.set_verbosity(logging.INFO)  # which remat and slice each compile tries
  generation = tpu_slices.GENERATIONS[args.generation]
  rows = [r for r in args.only.split(',') if r] or list(ROWS)
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    sys.exit(f'Unknown rows {unknown}: choose from {list(ROWS)}.')
  results = []
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as stand_ins:
    for row in rows:
      path, arg, stages = ROWS[row]
      config = runpy.run_path(str(REPO / path))['get_config'](arg)
      for stage in stages:
        stage_config = config.stages[stage] if 'stages' in config else config
        report, name = smallest_fit(row, stage, stage_config, generation, stand_ins)
        results.append((row, report, name))
  header = ('row', 'stage', 'model', 'batch', 'smallest slice', 'mesh', 'remat', 'layout',
            'peak/chip', 'of', 'model FLOP/step', 'est. step', 'est. MFU', 'compile')
  lines = [header]
  for row, r, name in results:
    lines.append((
        row, r.stage, f'{r.kind} {r.variant}', f'{r.batch_size:,}', name or 'none',
        compile_check.describe_mesh(r.mesh) if name else '', r.remat if name else '',
        r.layout if name else '', compile_check.describe_bytes(r.peak_bytes),
        compile_check.describe_bytes(r.capacity_bytes),
        compile_check.describe_count(r.analytic_flops),
        compile_check.describe_seconds(r.estimated_seconds) if r.estimated_seconds else '?',
        f'{r.estimated_mfu:.0%}' if r.estimated_mfu else '?', f'{r.compile_seconds:.0f} s'))
  print(f'\nThe smallest {args.generation} slice each fits on ({time.perf_counter() - started:.0f} '
        f's in all; a fit: peak <= {compile_check.MEMORY_FRACTION:.0%} of a chip):')
  print('| ' + ' | '.join(str(v) for v in header) + ' |')
  print('|' + '|'.join('---' for _ in header) + '|')
  for line in lines[1:]:
    print('| ' + ' | '.join(str(v) for v in line) + ' |')
  stand_in_notes = sorted({note for _, r, _ in results for note in r.stand_ins})
  if stand_in_notes:
    print(f'Stand-ins for what the data decides: {"; ".join(stand_in_notes)}.')


if __name__ == '__main__':
  main()
