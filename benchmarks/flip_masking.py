"""FLIP's speed-up from dropping patches: the train step at r = 0, 0.5 and 0.75.

Same model, batch and data for every ratio, timed in one run (the machine is
noisy: compare the ratios, not the absolute numbers across runs). Each step
is timed after compilation and one warm-up step; the median is reported.

  python benchmarks/flip_masking.py                                   # ViT-S/16, 224 px, batch 16
  python benchmarks/flip_masking.py --variant=B/16 --batch_size=256 --dtype=bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_pretrain import sharding as sharding_lib  # noqa: E402
from big_pretrain.objectives import build_objective  # noqa: E402
from big_pretrain.train.optim import make_optimizer, make_schedule  # noqa: E402
from big_pretrain.train.step import build_trainer  # noqa: E402
from configs import flip  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='S/16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--text_width', type=int, default=256)
  parser.add_argument('--text_depth', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per ratio')
  parser.add_argument('--ratios', default='0,0.5,0.75')
  return parser.parse_args()


def time_train_step(config, steps: int) -> tuple[float, float]:
  """(compile seconds, median seconds per step) of the jitted train step."""
  mesh = sharding_lib.make_mesh(config.mesh)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  trainer = build_trainer(build_objective(config), make_optimizer(config.optim, schedule),
                          schedule, mesh, sharding_lib.logical_axis_rules(config))
  rng = np.random.default_rng(0)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {
      'image': jax.device_put(rng.integers(0, 256, (config.batch_size, config.data.image_size,
                                                    config.data.image_size, 3), np.uint8),
                              batch_sharding),
      'text_tokens': jax.device_put(rng.integers(4, 40, (config.batch_size,
                                                         config.data.text.max_length), np.int32),
                                    batch_sharding),
  }
  state = trainer.init_state(jax.random.key(0))
  step_rng = jax.random.key(1)
  start = time.perf_counter()
  state, metrics = trainer.train_step(state, batch, step_rng)  # compiles
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  state, metrics = trainer.train_step(state, batch, step_rng)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, step_rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return compile_seconds, statistics.median(times)


def main():
  args = parse_args()
  rows = []
  for ratio in (float(r) for r in args.ratios.split(',')):
    config = flip.masked_stage('demo')
    config.model.variant = args.variant
    config.model.dtype = args.dtype
    config.data.image_size = args.image_size
    config.batch_size = args.batch_size
    config.objective.update(mask_ratio=ratio, text_width=args.text_width,
                            text_depth=args.text_depth, embed_dim=args.text_width)
    compile_seconds, seconds = time_train_step(config, args.steps)
    rows.append((ratio, seconds, args.batch_size / seconds, compile_seconds))
    print(f'r={ratio}: {seconds * 1000:.0f} ms/step', flush=True)

  base = rows[0][2]
  print(f'\nFLIP train step, ViT-{args.variant} at {args.image_size} px, text {args.text_width}x'
        f'{args.text_depth}, batch {args.batch_size}, {args.dtype}, '
        f'{jax.devices()[0].platform} x{jax.device_count()}, median of {args.steps} steps\n')
  print('| mask ratio | visible patches | ms / step | images / s | speed-up vs r=0 | compile s |')
  print('|-----------:|----------------:|----------:|-----------:|----------------:|----------:|')
  patches = (args.image_size // int(args.variant.split('/')[1])) ** 2
  for ratio, seconds, images_per_second, compile_seconds in rows:
    print(f'| {ratio:10.2f} | {int(patches * (1 - ratio)):15d} | {seconds * 1000:9.0f} | '
          f'{images_per_second:10.1f} | {images_per_second / base:14.2f}x | {compile_seconds:9.1f} |')


if __name__ == '__main__':
  main()
