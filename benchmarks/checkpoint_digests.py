"""What the checkpoint digests cost at save time, against the save itself.

  python benchmarks/checkpoint_digests.py                 # ViT-L/16 MAE state, 3 saves
  python benchmarks/checkpoint_digests.py --variant=B/16 --repeats=5

A train state of the given size (the MAE objective's parameters and AdamW's two moments,
random float32 values: incompressible, as trained weights are) is saved by the project's
Checkpointer, synchronously so the whole write is timed, with and without the digests
(storage/checksums.py), alternately. The digests are computed where the arrays are, before
Orbax copies them: their time is what a save's caller waits for in addition. Prints a
table: the state's size, the save (mean of the repeats), the digests alone, their share.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from big_pretrain.config.defaults import stage_config  # noqa: E402
from big_pretrain.objectives import build_objective  # noqa: E402
from big_pretrain.storage import checkpoints, checksums  # noqa: E402


class _DataPosition:
  """A data position of a few bytes, as a real one is."""

  def get_state(self):
    return b'{"next_index": 123456}'


def state_of(variant: str) -> dict:
  config = stage_config('mae')
  config.model.variant = variant
  shapes = nn.meta.unbox(jax.eval_shape(build_objective(config).init_params, jax.random.key(0)))
  keys = iter(jax.random.split(jax.random.key(0), 3 * len(jax.tree.leaves(shapes))))
  draw = lambda s: jax.random.normal(next(keys), s.shape, np.float32)  # noqa: E731
  return {'params': jax.tree.map(draw, shapes),
          'opt_state': {'mu': jax.tree.map(draw, shapes), 'nu': jax.tree.map(draw, shapes)}}


def timed_save(folder: str, step: int, state, with_digests: bool) -> float:
  config = ml_collections.ConfigDict({'every_steps': 1, 'keep': 1, 'async_save': False})
  checkpointer = checkpoints.Checkpointer(folder, config)
  real = checksums.tree_digests
  if not with_digests:
    checksums.tree_digests = lambda tree: {}
  try:
    started = time.perf_counter()
    checkpointer.save(step, state, _DataPosition(), force=True)
    checkpointer.wait_until_finished()
    return time.perf_counter() - started
  finally:
    checksums.tree_digests = real
    checkpointer.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='L/16')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  state = state_of(args.variant)
  jax.block_until_ready(state)
  size = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  checksums.tree_digests(state)  # compiled once, outside the timings
  digest_times, with_times, without_times = [], [], []
  root = tempfile.mkdtemp(prefix='digests_')
  try:
    for repeat in range(args.repeats):
      started = time.perf_counter()
      checksums.tree_digests(state)
      digest_times.append(time.perf_counter() - started)
      order = ((True, with_times), (False, without_times))
      for with_digests, times in (order if repeat % 2 else order[::-1]):
        folder = os.path.join(root, f'{repeat}_{with_digests}')
        times.append(timed_save(folder, repeat, state, with_digests))
        shutil.rmtree(folder)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
  print(f'\nViT-{args.variant} MAE state (params + AdamW moments), {size / 2**30:.2f} GiB, '
        f'{jax.devices()[0].platform}, {args.repeats} saves each, alternating:')
  print('| save without digests | save with digests | digests alone | digests / save |')
  print('|---:|---:|---:|---:|')
  print(f'| {mean(without_times):.2f} s | {mean(with_times):.2f} s | {mean(digest_times):.2f} s '
        f'| {mean(digest_times) / mean(without_times):.1%} |')


if __name__ == '__main__':
  main()
