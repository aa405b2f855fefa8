"""The training loop against its bare step: what input, transfer and bookkeeping cost.

Rows of one run, same model, batch and device:

  bare step         the compiled train step on one fixed device batch
                    (benchmarks/step.py's run_row: no input at all)
  loop, prefetch N  train_stage, the real loop: the Grain pipeline on the
                    config's data (decode, crop, flip, batch), the transfer to
                    the device, metrics and progress, with
                    config.data.device_prefetch = N (0: batched and transferred
                    in the loop's thread; N >= 1: N batches ahead in a thread)

A loop row's images/s is the median over its log intervals after the first
(which holds compilation). "of bare step" is that over the bare step's images/s:
100% means the loop costs nothing beyond the step. Rows run `--repeats` times,
interleaved; the table shows each row's best.

  python benchmarks/loop.py                                   # MAE demo config, ~2 min on 2 cores
  python benchmarks/loop.py --config=configs/wsp.py:demo --prefetch=0,1,2,4 --threads=auto,8

The machine may be shared: compare rows of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
from absl import logging  # noqa: E402

from big_pretrain.data import pipeline as pipeline_lib  # noqa: E402
from big_pretrain.train.loop import train_stage  # noqa: E402

import step as step_benchmark  # noqa: E402  (benchmarks/step.py: this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/mae.py:demo',
                      help='a config file and its argument, as main.py takes them')
  parser.add_argument('--steps', type=int, default=60, help='steps per loop row')
  parser.add_argument('--log_every', type=int, default=10, help='steps per timed interval')
  parser.add_argument('--prefetch', default='0,2', help='device_prefetch values, one row each')
  parser.add_argument('--threads', default='auto',
                      help="data.num_threads values ('auto': one per core, at most 16), "
                           'one row each with every --prefetch')
  parser.add_argument('--repeats', type=int, default=2)
  return parser.parse_args(argv)


def load_config(text: str):
  """The config of --config=path[:arg], as main.py loads it; of a chain, its last stage."""
  path, _, arg = text.partition(':')
  config = runpy.run_path(os.path.join(ROOT, path))['get_config'](arg or None)
  return list(config.stages.values())[-1] if 'stages' in config else config


def loop_images_per_second(config, prefetch: int, threads: int | None, args) -> float:
  config = config.copy_and_resolve_references()
  config.data.device_prefetch = prefetch
  config.data.num_threads = threads
  config.total_steps = args.steps
  config.log.every_steps = args.log_every
  config.checkpoint.update(every_steps=10 * args.steps, async_save=True)
  config.evals = {}
  with tempfile.TemporaryDirectory() as workdir:
    result = train_stage(config, workdir, devices=jax.devices()[:1])
  intervals = [metrics['images_per_sec'] for _, metrics in result.history[1:]]
  return statistics.median(intervals)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  config = load_config(args.config)
  step_config = config.copy_and_resolve_references()
  step_config.mesh.update(data=1, fsdp=1, tensor=1)
  prefetches = [int(value) for value in args.prefetch.split(',')]
  thread_counts = [None if value == 'auto' else int(value) for value in args.threads.split(',')]
  rows = [(prefetch, threads) for threads in thread_counts for prefetch in prefetches]

  best: dict[str, float] = {}
  for repeat in range(args.repeats):
    row = step_benchmark.run_row(config.objective.name, step_config,
                                 argparse.Namespace(devices=1, warmup=3, steps=20))
    best['bare step'] = max(best.get('bare step', 0.0), row.images_per_second)
    for prefetch, threads in rows:
      config.data.num_threads = threads
      name = (f'loop, prefetch {prefetch}, '
              f'{pipeline_lib.num_reader_threads(config.data)} Grain threads')
      images_per_second = loop_images_per_second(config, prefetch, threads, args)
      print(f'  repeat {repeat + 1}: {name}: {images_per_second:.0f} images/s', flush=True)
      best[name] = max(best.get(name, 0.0), images_per_second)

  device = jax.devices()[0]
  print(f'\n{args.config}: {config.objective.name} {config.model.variant}, batch '
        f'{config.batch_size}, {config.data.image_size} px, data {config.data.source}, '
        f'{device.platform} "{device.device_kind}" x1, {os.cpu_count()} CPU cores; '
        f'best of {args.repeats}\n')
  step_benchmark.print_table(['row', 'images/s', 'of bare step'], [
      [name, f'{value:.0f}', f'{value / best["bare step"]:.0%}'] for name, value in best.items()])


if __name__ == '__main__':
  main()
