"""The shape of MAE's fine-tuning claims, on one dataset at CPU size.

One MAE encoder (configs/mae.py:demo), then with the same fine-tuning budget
(configs/finetune.py:demo: steps, batch, lr, layer decay, mixup / cutmix,
RandAugment, erasing, drop path): its linear probe (L-BFGS on frozen
features), partial fine-tuning (the head alone; the last block's MLP; the
last block), full fine-tuning, and full fine-tuning from random
initialization. Prints held-out top-1 of each and what it trained.

MAE's paper (ViT-L, ImageNet): linear 73.5 (68.0 in its Fig. 9 protocol) ->
last block's MLP 79.1 -> last block 81.0 -> full 84.9 (from scratch 82.6).

  python benchmarks/probe_vs_finetune.py                          # ~10 min on 2 CPU cores
  python benchmarks/probe_vs_finetune.py --mae_steps=3000 --finetune_steps=1200
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

import jax  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402

from big_pretrain.stages import chain  # noqa: E402
from big_pretrain.train import optim  # noqa: E402
from big_pretrain.train.loop import train_stage  # noqa: E402
from configs import mae_then_finetune  # noqa: E402

# (row, objective.trainable, start from MAE?)
RUNS = (
    ('head only (fc_norm + linear head)', 'head', True),
    ("last block's MLP", 'last_block_mlp', True),
    ('last block', 'last_k_blocks', True),
    ('full fine-tuning', 'all', True),
    ('full fine-tuning from scratch', 'all', False),
)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mae_steps', type=int, default=None, help='default: the demo config')
  parser.add_argument('--finetune_steps', type=int, default=None,
                      help='default: the demo config')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='default: a temporary folder')
  return parser.parse_args()


def trained_parameters(result) -> int:
  """Parameters that moved during fine-tuning (frozen ones hold no Adam moments)."""
  adam = optim.find_state(result.state.opt_state, optax.ScaleByAdamState)
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(adam.mu))


def main():
  args = parse_args()
  logging.set_verbosity(logging.WARNING)
  config = mae_then_finetune.get_config('demo')
  for stage in config.stages.values():
    stage.seed = args.seed
  if args.mae_steps:
    config.stages.mae.total_steps = args.mae_steps
  if args.finetune_steps:
    config.stages.finetune.total_steps = args.finetune_steps
  workdir = args.workdir or tempfile.mkdtemp(prefix='finetune_benchmark_')
  print(f'workdir: {workdir}', flush=True)

  start = time.time()
  mae = train_stage(config.stages.mae, os.path.join(workdir, 'mae'))
  print(f'MAE: {time.time() - start:.0f} s', flush=True)
  rows = [('linear probe (frozen features, L-BFGS)', '-',
           mae.eval_results['linear_probe']['accuracy'], None, None)]
  for name, trainable, from_mae in RUNS:
    stage = config.stages.finetune.copy_and_resolve_references()
    stage.objective.trainable = trainable
    stage.init_from.stage = None
    stage.init_from.checkpoint = os.path.join(workdir, 'mae') if from_mae else None
    start = time.time()
    result = train_stage(stage, os.path.join(workdir, f'{trainable}_{int(from_mae)}'),
                         initialize=chain.initializer_from(stage.init_from, workdir))
    seconds = time.time() - start
    print(f'{name}: {seconds:.0f} s', flush=True)
    rows.append((name, trainable, result.eval_results['classification']['top1'],
                 trained_parameters(result), seconds))

  mae_stage, finetune_stage = config.stages.mae, config.stages.finetune
  chance = result.eval_results['classification']['chance']
  print()
  print(f'MAE {mae_stage.model.variant}: {mae_stage.total_steps} steps x batch '
        f'{mae_stage.batch_size}. Fine-tuning: {finetune_stage.total_steps} steps x batch '
        f'{finetune_stage.batch_size}, layer decay {finetune_stage.optim.layer_decay}, drop path '
        f'{finetune_stage.model.drop_path}, augment {finetune_stage.data.augment!r}, mixup '
        f'{finetune_stage.objective.mixup_alpha} / cutmix {finetune_stage.objective.cutmix_alpha}. '
        f'Held-out top-1 on {int(result.eval_results["classification"]["examples"])} '
        f'images; chance {chance:.3f}; seed {args.seed}.')
  print()
  print('| MAE encoder, then | objective.trainable | trained parameters | held-out top-1 '
        '| time s |')
  print('|---|---|---:|---:|---:|')
  for name, trainable, top1, trained, seconds in rows:
    print(f'| {name} | {trainable} | {"" if trained is None else f"{trained:,}"} | {top1:.3f} | '
          f'{"" if seconds is None else f"{seconds:.0f}"} |')


if __name__ == '__main__':
  main()
