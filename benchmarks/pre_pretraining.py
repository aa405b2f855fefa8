"""Does MAE pre-pretraining help WSP? (the MAWS claim, measured on the embedded data)

Trains MAE, then WSP twice with the same budget (steps, batch, lr, seed): once
from random initialization, once from the MAE encoder. Prints the linear-probe
and k-NN accuracy of both on the held-out split, and both WSP training losses
at several points.

  python benchmarks/pre_pretraining.py                       # the demo chain's settings
  python benchmarks/pre_pretraining.py --mae_steps=3000 --wsp_steps=1000 --variant=mu/4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Run from anywhere: the configs/ package lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import logging  # noqa: E402

from big_pretrain.stages import chain  # noqa: E402
from big_pretrain.train.loop import train_stage  # noqa: E402
from configs import mae_then_wsp  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mae_steps', type=int, default=None, help='default: the demo config')
  parser.add_argument('--wsp_steps', type=int, default=None, help='default: the demo config')
  parser.add_argument('--variant', default=None, help='ViT variant for both stages, e.g. mu/4')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='default: a temporary folder')
  return parser.parse_args()


def main():
  args = parse_args()
  logging.set_verbosity(logging.WARNING)
  config = mae_then_wsp.get_config('demo')
  for stage in config.stages.values():
    stage.seed = args.seed
    if args.variant:
      stage.model.variant = args.variant
  if args.mae_steps:
    config.stages.mae.total_steps = args.mae_steps
  if args.wsp_steps:
    config.stages.wsp.total_steps = args.wsp_steps
  workdir = args.workdir or tempfile.mkdtemp(prefix='pre_pretraining_')
  print(f'workdir: {workdir}')

  start = time.time()
  mae = train_stage(config.stages.mae, os.path.join(workdir, 'mae'))
  mae_seconds = time.time() - start

  runs = {}
  for name, init_checkpoint in (('random init', None), ('MAE init', os.path.join(workdir, 'mae'))):
    wsp = config.stages.wsp.copy_and_resolve_references()
    wsp.init_from.stage = None
    wsp.init_from.checkpoint = init_checkpoint
    stage_dir = os.path.join(workdir, 'wsp_' + name.split()[0].lower())
    start = time.time()
    runs[name] = (train_stage(wsp, stage_dir, initialize=chain.initializer_from(wsp.init_from, workdir)),
                  time.time() - start)

  mae_stage, wsp_stage = config.stages.mae, config.stages.wsp
  print()
  print(f'MAE: {mae_stage.model.variant}, {mae_stage.total_steps} steps x batch '
        f'{mae_stage.batch_size} ({mae_seconds:.0f} s); final loss {mae.last_metrics["loss"]:.4f}; '
        f'linear probe {mae.eval_results["linear_probe"]["accuracy"]:.3f}, '
        f'k-NN {mae.eval_results["knn"]["accuracy"]:.3f}')
  print(f'WSP: {wsp_stage.total_steps} steps x batch {wsp_stage.batch_size}, '
        f'lr_per_256 {wsp_stage.optim.lr_per_256}, seed {args.seed}, same for both runs')
  print()
  names = list(runs)
  print(f'| {"":<34} | ' + ' | '.join(f'{n:>12}' for n in names) + ' |')
  print(f'|{"-" * 36}|' + '|'.join('-' * 14 for _ in names) + '|')
  row = lambda label, values: print(f'| {label:<34} | ' + ' | '.join(f'{v:>12}' for v in values) + ' |')
  for evaluator in ('linear_probe', 'knn'):
    row(f'{evaluator} accuracy (held-out)',
        [f'{runs[n][0].eval_results[evaluator]["accuracy"]:.3f}' for n in names])
  steps = [step for step, _ in runs[names[0]][0].history]
  shown = sorted(set(steps[::max(1, len(steps) // 5)] + [steps[-1]]))
  for step in shown:
    row(f'WSP train loss @ step {step}',
        [f'{dict(runs[n][0].history)[step]["loss"]:.4f}' for n in names])
  row('WSP precision@1 (last interval)',
      [f'{runs[n][0].last_metrics["precision_at_1"]:.3f}' for n in names])
  row('WSP wall time (s)', [f'{runs[n][1]:.0f}' for n in names])


if __name__ == '__main__':
  main()
