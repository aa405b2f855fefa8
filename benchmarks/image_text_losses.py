"""FLIP's softmax (InfoNCE) loss vs SigLIP's sigmoid loss: quality, and per-chip logits memory.

Part 1, quality: on the embedded data, the demo-size image-text stage
(configs/siglip.py:demo, and the same stage with the softmax loss) trained at
each mask ratio and seed, at equal steps and batch; zero-shot (colour, and
shape) and retrieval of both, mean and standard deviation over seeds, and the
paired difference (sigmoid - softmax, same seed: same initial towers and data
order) with a 95% t-interval. Each run is a workdir under --workdir; a rerun
skips the finished ones and resumes the others.

Part 2, memory: the loss and its gradient alone (embeddings in, no towers),
compiled for TPU slices at global batch 32768 with the TPU compiler (libtpu,
`make install-tpu-compile`; no TPU needed), and XLA's temporary memory per
chip beside the logits' analytic size: softmax rows span the global batch
(local x global), the sigmoid loss's blocks do not (local x local).

  python benchmarks/image_text_losses.py                       # both parts (~35 min on 2 cores)
  python benchmarks/image_text_losses.py --seeds=0 --steps=100  # a quick look
  python benchmarks/image_text_losses.py --parts=memory --slices=v5p-16,v5p-64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from stage_sweeps import mean_sd, paired_interval, run_stage  # noqa: E402  (beside this script)

METRICS = (('zero_shot', 'accuracy', 'zero-shot colour'),
           ('zero_shot_shape', 'accuracy', 'zero-shot shape'),
           ('retrieval', 'image_to_text_recall@1', 'image->text R@1'),
           ('retrieval', 'text_to_image_recall@1', 'text->image R@1'))
LOSSES = ('softmax', 'sigmoid')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--parts', default='quality,memory')
  parser.add_argument('--mask_ratios', default='0,0.5,0.75')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=None, help="default: the demo's (800)")
  parser.add_argument('--workdir', default='workdirs/benchmarks/image_text_losses')
  parser.add_argument('--batch_size', type=int, default=32768, help='memory: global batch')
  parser.add_argument('--embed_dim', type=int, default=768, help='memory: embedding width')
  parser.add_argument('--slices', default='v5p-16,v5p-64', help='memory: TPU slices')
  return parser.parse_args()


# --- Part 1: quality ------------------------------------------------------------------------

def stage_config(loss: str, mask_ratio: float, seed: int, steps: int | None):
  """The demo stage with `loss`; everything else (steps, batch, lr, towers) the same."""
  from configs import siglip
  config = siglip.get_config('demo')
  config.objective.loss = loss
  config.objective.temperature_init = None  # each loss's paper value: 0.07 / 0.1
  config.objective.mask_ratio = mask_ratio
  config.seed = seed
  config.data.seed = seed
  if steps:
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 10))
    config.checkpoint.every_steps = steps
  return config


def quality(args) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  masks = [float(r) for r in args.mask_ratios.split(',')]
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {}
  start = time.time()
  for mask in masks:
    for seed in seeds:
      for loss in LOSSES:
        config = stage_config(loss, mask, seed, args.steps)
        name = f'{loss}_mask{mask:g}_seed{seed}'
        results[loss, mask, seed] = run_stage(config, os.path.join(args.workdir, name))['eval']
        print(f'  {name}: done ({time.time() - start:.0f} s so far)', flush=True)
  config = stage_config('sigmoid', 0.0, 0, args.steps)
  print()
  print(f'Image-text losses on the embedded data: {config.model.variant} image tower, text '
        f'{config.objective.text_width}x{config.objective.text_depth}, '
        f'{config.total_steps} steps x batch {config.batch_size}, seeds {seeds} '
        f'(chance: colour 0.091, shape 0.100)')
  print()
  header = '| mask | metric | softmax | sigmoid | sigmoid - softmax (95% CI) |'
  print(header)
  print('|-----:|:-------|--------:|--------:|:--------------------------|')
  for mask in masks:
    for evaluator, metric, label in METRICS:
      value = lambda loss, seed: results[loss, mask, seed][evaluator][metric]
      cells = []
      for loss in LOSSES:
        mean, sd = mean_sd([value(loss, seed) for seed in seeds])
        cells.append(f'{mean:.3f} ± {sd:.3f}')
      difference, half_width = paired_interval(
          [value('sigmoid', seed) - value('softmax', seed) for seed in seeds])
      print(f'| {mask:.2f} | {label} | {cells[0]} | {cells[1]} | '
            f'{difference:+.3f} ± {half_width:.3f} |')
  print()
  print(f'(mean ± standard deviation over {len(seeds)} seeds; the interval is the paired '
        f'difference\'s, t with {len(seeds) - 1} degrees of freedom; '
        f'{time.time() - start:.0f} s)')


# --- Part 2: per-chip logits memory -------------------------------------------------------

def logits_bytes(loss: str, global_batch: int, batch_shards: int) -> int:
  """The float32 logits one device holds at once: softmax's rows of the global batch,
  the sigmoid loss's one local block."""
  local = global_batch // batch_shards
  return 4 * local * (global_batch if loss == 'softmax' else local)


def memory(args) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from big_pretrain import sharding as sharding_lib
  from big_pretrain import tpu_slices
  from big_pretrain.objectives import flip, sigmoid_loss
  from big_pretrain.compile_for import describe_bytes

  def loss_of(name):
    def loss(images, texts, t_prime, bias):
      images, texts = flip.l2_normalize(images), flip.l2_normalize(texts)
      if name == 'softmax':
        return flip.contrastive_loss(images, texts, flip.logit_scale_from(t_prime))[0]
      return sigmoid_loss.sigmoid_loss(images, texts, jnp.exp(t_prime), bias)[0]
    return jax.grad(loss, argnums=(0, 1, 2, 3))

  n, dim = args.batch_size, args.embed_dim
  print(f'The loss and its gradient alone, global batch {n:,}, embeddings {dim} wide '
        '(bfloat16 in, float32 logits), batch over every chip (data axis)')
  print()
  print('| slice | chips | per chip | loss | logits held (analytic) | XLA temp memory per chip |')
  print('|:------|------:|---------:|:-----|-----------------------:|-------------------------:|')
  for slice_name in args.slices.split(','):
    tpu_slice = tpu_slices.parse_slice(slice_name)
    try:
      devices = tpu_slices.topology_devices(tpu_slice)
    except RuntimeError as error:
      devices, why = None, str(error).split('.')[0]
    chips = tpu_slice.num_devices
    for name in LOSSES:
      compiled = 'not compiled'
      if devices:
        mesh = sharding_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, devices)
        embeddings = jax.ShapeDtypeStruct((n, dim), jnp.bfloat16, sharding=NamedSharding(
            mesh, PartitionSpec(sharding_lib.BATCH_AXES)))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(
            mesh, PartitionSpec()))
        with sharding_lib.activate(mesh, sharding_lib.DEFAULT_LOGICAL_AXIS_RULES):
          program = jax.jit(loss_of(name)).lower(embeddings, embeddings, scalar, scalar)
          compiled = describe_bytes(program.compile().memory_analysis().temp_size_in_bytes)
      else:
        compiled = f'({why})'
      print(f'| {slice_name} | {chips} | {n // chips:,} | {name} | '
            f'{describe_bytes(logits_bytes(name, n, chips))} | {compiled} |', flush=True)


def main():
  args = parse_args()
  parts = args.parts.split(',')
  if 'quality' in parts:
    quality(args)
  if 'memory' in parts:
    print()
    memory(args)


if __name__ == '__main__':
  main()
