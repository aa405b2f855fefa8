"""The training loop against its bare step: what input, transfer and bookkeeping cost.

Rows of one run, same model, batch and device:

  bare step         the compiled train step on one fixed device batch
                    (benchmarks/step_speed.py's run_row: no input at all)
  input alone       (with --jpegs or --data) the Grain pipeline alone, batches
                    read on the host and dropped: images/s, and images per
                    CPU-second of this process (all threads), the input's
                    throughput per core it keeps busy
  loop, prefetch N  train_stage, the real loop: the Grain pipeline on the
                    config's data (decode, crop, flip, batch), the transfer to
                    the device, metrics and progress, with
                    config.data.device_prefetch = N (0: batched and transferred
                    in the loop's thread; N >= 1: N batches ahead in a thread)

A loop row's images/s is the median over its log intervals after the first
(which holds compilation). "of bare step" is that over the bare step's images/s:
100% means the loop costs nothing beyond the step. "cores to feed the bare step"
is the bare step's images/s over the input's images per CPU-second. Rows run
`--repeats` times, interleaved; the table shows each row's best.

Two ways to choose the stage:

  python benchmarks/loop_speed.py                              # MAE demo config, ~2 min on 2 cores
  python benchmarks/loop_speed.py --config=configs/wsp.py:demo --prefetch=0,1,2,4 --threads=auto,8

  # MAE as benchmarks/step_speed.py builds it (same flags, so the same compiled step), on real
  # JPEGs: --jpegs=N generates N of them (500x375, as benchmarks/input_speed.py does; --jpeg_size),
  # or --data=DIR takes an image folder; either is converted to ArrayRecord first
  # (python -m big_pretrain.data.convert) unless --source=image_folder.
  python benchmarks/loop_speed.py --jpegs=2048 --variant=B/16 --batch_size=256 --dtype=bfloat16 \
      --steps=80 --repeats=1 --json=loop.json                  # on a GPU host

The machine may be shared: compare rows of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
from absl import logging  # noqa: E402

from big_pretrain import sharding as sharding_lib  # noqa: E402
from big_pretrain.data import process_share  # noqa: E402
from big_pretrain.data import train_input as pipeline_lib  # noqa: E402
from big_pretrain.train.loop import train_stage  # noqa: E402

from generated_jpegs import generate_image_folder  # noqa: E402  (beside this script)
import step_speed as step_benchmark  # noqa: E402  (beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/mae.py:demo',
                      help='a config file and its argument, as main.py takes them (without '
                           '--jpegs or --data)')
  parser.add_argument('--jpegs', type=int, default=0,
                      help='generate this many JPEGs and train MAE on them (see the module doc)')
  parser.add_argument('--jpeg_size', default='500x375', help='WIDTHxHEIGHT of generated JPEGs')
  parser.add_argument('--data', default=None, help='an image folder to train MAE on')
  parser.add_argument('--source', default='array_record', choices=('array_record', 'image_folder'),
                      help='with --jpegs or --data: read the images converted to ArrayRecord, '
                           'or straight from the folder')
  parser.add_argument('--variant', default='B/16')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override of the MAE stage, as benchmarks/step_speed.py takes it')
  parser.add_argument('--steps', type=int, default=60, help='steps per loop row')
  parser.add_argument('--log_every', type=int, default=10, help='steps per timed interval')
  parser.add_argument('--prefetch', default='0,2', help='device_prefetch values, one row each')
  parser.add_argument('--threads', default='auto',
                      help="data.num_threads values ('auto': one per core, at most 16), "
                           'one row each with every --prefetch')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--json', default='', metavar='PATH',
                      help='also write the rows to PATH (benchmarks/gpu_goals.py reads it)')
  return parser.parse_args(argv)


def load_config(text: str):
  """The config of --config=path[:arg], as main.py loads it; of a chain, its last stage."""
  path, _, arg = text.partition(':')
  config = runpy.run_path(os.path.join(ROOT, path))['get_config'](arg or None)
  return list(config.stages.values())[-1] if 'stages' in config else config


def mae_on_images(args, folder: str, workdir: str):
  """benchmarks/step_speed.py's MAE stage for these flags (its compiled step is the same program),
  reading `folder` (an image folder) as --source says."""
  step_args = step_benchmark.parse_args(
      ['--variant', args.variant, '--batch_size', str(args.batch_size), '--image_size',
       str(args.image_size), '--dtype', args.dtype, *(f'--set={s}' for s in args.set)])
  config = step_benchmark.stage_for('mae', step_args, workdir)
  if args.source == 'array_record':
    from big_pretrain.data import convert  # pylint: disable=g-import-not-at-top
    records = os.path.join(workdir, 'array_record')
    start = time.perf_counter()
    convert.convert(folder, records)
    print(f'  converted {folder} to ArrayRecord in {time.perf_counter() - start:.1f} s',
          flush=True)
    folder = records
  config.data.update(source=args.source, path=folder)
  return config


def loop_images_per_second(config, prefetch: int, threads: int | None, args) -> float:
  """The real loop for --steps steps (stopped early: the schedule, and so the compiled
  step, stays the bare step's); the median of its log intervals after the first."""
  config = config.copy_and_resolve_references()
  config.data.device_prefetch = prefetch
  config.data.num_threads = threads
  config.log.every_steps = args.log_every
  config.checkpoint.update(every_steps=10 * config.total_steps, async_save=True)
  config.evals = {}
  with tempfile.TemporaryDirectory(dir=scratch_folder()) as workdir:
    result = train_stage(config, workdir, devices=jax.devices()[:1],
                         stop_after_steps=args.steps)
  intervals = [metrics['images_per_sec'] for _, metrics in result.history[1:]]
  return statistics.median(intervals)


def scratch_folder(needed_bytes: int = 8 * 2 ** 30) -> str | None:
  """Where the loop's workdir goes: the early stop saves a checkpoint (1.3 GB for B/16), so
  to a RAM disk if one has room (containers often give /dev/shm 64 MB), else the default."""
  ram_disk = '/dev/shm'
  if os.path.isdir(ram_disk) and shutil.disk_usage(ram_disk).free > needed_bytes:
    return ram_disk
  return None


def input_alone(config, threads: int | None, batches: int) -> tuple[float, float]:
  """(images/s, images per CPU-second) of the training pipeline alone, read on the host."""
  data_config = config.data.copy_and_resolve_references()
  data_config.num_threads = threads
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  data = pipeline_lib.InputPipeline(data_config, global_batch_size=config.batch_size,
                                    mesh=mesh, seed=config.seed)
  for _ in range(2):  # fills Grain's buffers
    data.next_local_numpy()
  times = os.times()
  start = time.perf_counter()
  for _ in range(batches):
    data.next_local_numpy()
  seconds = time.perf_counter() - start
  end = os.times()
  cpu_seconds = (end.user - times.user) + (end.system - times.system)
  images = batches * config.batch_size
  return images / seconds, images / cpu_seconds


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  prefetches = [int(value) for value in args.prefetch.split(',')]
  thread_counts = [None if value == 'auto' else int(value) for value in args.threads.split(',')]
  rows = [(prefetch, threads) for threads in thread_counts for prefetch in prefetches]
  on_images = bool(args.jpegs or args.data)

  with tempfile.TemporaryDirectory(prefix='loop_benchmark_') as workdir:
    if on_images:
      folder = args.data
      if args.jpegs:
        folder = os.path.join(workdir, 'jpegs')
        start = time.perf_counter()
        generate_image_folder(
            folder, args.jpegs, size=tuple(int(v) for v in args.jpeg_size.split('x')))
        print(f'  generated {args.jpegs} JPEGs of {args.jpeg_size} in '
              f'{time.perf_counter() - start:.1f} s', flush=True)
      config = mae_on_images(args, folder, workdir)
      describe = (f'MAE as benchmarks/step_speed.py builds it, on {folder} '
                  f'({args.source}, decode_at_crop_scale={config.data.decode_at_crop_scale})')
    else:
      config = load_config(args.config)
      describe = args.config
    step_config = config.copy_and_resolve_references()
    step_config.mesh.update(data=1, fsdp=1, tensor=1)

    best: dict[str, float] = {}
    per_cpu_second: dict[str, float] = {}
    for repeat in range(args.repeats):
      row = step_benchmark.run_row(config.objective.name, step_config,
                                   argparse.Namespace(devices=1, warmup=3, steps=20, profile=''))
      best['bare step'] = max(best.get('bare step', 0.0), row.images_per_second)
      if on_images:
        for threads in thread_counts:
          config.data.num_threads = threads
          name = f'input alone, {process_share.num_reader_threads(config.data)} Grain threads'
          images_per_second, images_per_cpu_second = input_alone(
              config, threads, batches=max(4, 2048 // config.batch_size))
          print(f'  repeat {repeat + 1}: {name}: {images_per_second:.0f} images/s, '
                f'{images_per_cpu_second:.0f} per CPU-second', flush=True)
          best[name] = max(best.get(name, 0.0), images_per_second)
          per_cpu_second[name] = max(per_cpu_second.get(name, 0.0), images_per_cpu_second)
      for prefetch, threads in rows:
        config.data.num_threads = threads
        name = (f'loop, prefetch {prefetch}, '
                f'{process_share.num_reader_threads(config.data)} Grain threads')
        images_per_second = loop_images_per_second(config, prefetch, threads, args)
        print(f'  repeat {repeat + 1}: {name}: {images_per_second:.0f} images/s', flush=True)
        best[name] = max(best.get(name, 0.0), images_per_second)

  device = jax.devices()[0]
  print(f'\n{describe}: {config.objective.name} {config.model.variant}, batch '
        f'{config.batch_size}, {config.data.image_size} px, {config.model.dtype}, '
        f'{device.platform} "{device.device_kind}" x1, {os.cpu_count()} CPU cores; '
        f'best of {args.repeats}\n')
  bare = best['bare step']
  step_benchmark.print_table(
      ['row', 'images/s', 'of bare step', 'images per CPU-s', 'cores to feed the bare step'],
      [[name, f'{value:.0f}', f'{value / bare:.0%}',
        f'{per_cpu_second[name]:.0f}' if name in per_cpu_second else '',
        f'{bare / per_cpu_second[name]:.1f}' if name in per_cpu_second else '']
       for name, value in best.items()])
  if args.json:
    loops = {name: value for name, value in best.items() if name.startswith('loop')}
    best_loop = max(loops, key=loops.get)
    with open(args.json, 'w', encoding='utf-8') as file:
      json.dump(dict(
          variant=config.model.variant, batch_size=config.batch_size, dtype=config.model.dtype,
          device=f'{device.platform} {device.device_kind}', host_cores=os.cpu_count(),
          data=describe, bare_images_per_sec=bare, best_loop=best_loop,
          loop_images_per_sec=loops[best_loop], loop_fraction=loops[best_loop] / bare,
          input_images_per_cpu_second=max(per_cpu_second.values(), default=None),
          cores_to_feed_bare_step=(bare / max(per_cpu_second.values())
                                   if per_cpu_second else None),
          rows=best), file, indent=2)


if __name__ == '__main__':
  main()
