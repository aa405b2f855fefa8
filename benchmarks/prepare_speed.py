"""Data preparation speed: the converter and the vocabulary builder, in process and on Beam.

Converter rows: `python -m big_pretrain.data.convert` on generated webdataset tars of
~70 KB JPEGs (benchmarks/generated_jpegs.py) with captions and labels, each run a fresh
process into an empty folder:

  in process          no --runner (no Beam)
  Beam, 1 worker      --runner=DirectRunner --direct_num_workers=1
  Beam, 2 workers     --runner=DirectRunner --direct_num_workers=2
                      --direct_running_mode=multi_processing
  ... + dedup         the same, with --dedup_against a folder of --held_out images

examples/s and MB/s (tar bytes read) are over the command's wall time, start-up included
(Beam's is ~2-4 s: compare rows of the same size). "vs in process" is the ratio within
this run. The per-worker rate (the 1-worker Beam row, whose process does everything one
Dataflow worker thread would) gives the number of workers that would prepare 3 billion
images in a day; Dataflow runs one such process per vCPU.

Vocabulary rows (`build_vocabulary labels`) come from prepare_vocabulary_memory.py: peak
memory of the whole process tree for 1 and 4 million captions over the same tags.

  python benchmarks/prepare_speed.py                      # ~15 min on 2 cores
  python benchmarks/prepare_speed.py --skip_vocabulary    # the converter alone, ~6 min
  python benchmarks/prepare_speed.py --num_examples=400 --num_tars=4 --skip_vocabulary  # ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generated_jpegs  # pylint: disable=g-import-not-at-top,wrong-import-position
import prepare_vocabulary_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGES_PER_DAY_TARGET = 3_000_000_000
SECONDS_PER_DAY = 86_400
ROWS = prepare_vocabulary_memory.ROWS  # in process; Beam with 1 worker; with 2 processes


def write_tars(folder: str, num_examples: int, num_tars: int) -> tuple[str, int]:
  """Webdataset tars of generated JPEGs with a caption (two hashtags) and a label each.
  Returns the --input pattern and the tars' total size in bytes."""
  images = os.path.join(folder, 'images')
  generated_jpegs.generate_image_folder(images, num_examples)
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(images)
                 for name in names if name.endswith('.jpg'))
  per_tar = -(-len(files) // num_tars)
  total = 0
  for tar_index in range(num_tars):
    path = os.path.join(folder, f'shard-{tar_index:04d}.tar')
    with tarfile.open(path, 'w') as archive:
      for position, image in enumerate(files[tar_index * per_tar:(tar_index + 1) * per_tar]):
        key = f'{tar_index:04d}{position:05d}'
        label = os.path.basename(os.path.dirname(image))
        for name, data in ((f'{key}.jpg', open(image, 'rb').read()),
                           (f'{key}.txt', f'a photo #{label} #tag{position % 50}'.encode()),
                           (f'{key}.cls', str(generated_jpegs.NUM_CLASSES - 1).encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          archive.addfile(info, io.BytesIO(data))
    total += os.path.getsize(path)
  return os.path.join(folder, f'shard-{{0000..{num_tars - 1:04d}}}.tar'), total


def timed_command(arguments: list[str]) -> float:
  """Wall seconds of `python arguments`."""
  start = time.perf_counter()
  finished = subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                            check=False)
  wall = time.perf_counter() - start
  if finished.returncode:
    raise RuntimeError(f'{" ".join(arguments)} failed:\n{finished.stderr[-3000:]}')
  return wall


def convert_rows(tars: str, total_bytes: int, num_examples: int, tiny_tar: str,
                 held_out: str | None, repeats: int, scratch: str) -> list[dict]:
  """Each row timed on the tars and on one tiny tar (its start-up: planning, Beam's
  workers, the held-out hashes), interleaved `repeats` times; the fastest of each."""
  rows = []
  variants = [(name, flags, ()) for name, flags in ROWS]
  if held_out:
    variants += [(f'{name} + dedup', flags, (f'--dedup_against={held_out}',))
                 for name, flags in ROWS]
  times = {(name, size): [] for name, _, _ in variants for size in ('full', 'tiny')}
  for repeat in range(repeats):
    for name, flags, extra in variants:  # interleaved: the machine's noise hits all rows
      for size, inputs in (('full', tars), ('tiny', tiny_tar)):
        output = os.path.join(scratch, f'out-{repeat}-{size}-{name.replace(" ", "_")}')
        wall = timed_command(['-m', 'big_pretrain.data.convert', f'--input={inputs}',
                                 f'--output={output}', *extra, *flags])
        times[name, size].append(wall)
  base = min(times['in process', 'full'])
  for name, _, _ in variants:
    wall, start_up = min(times[name, 'full']), min(times[name, 'tiny'])
    rows.append({'row': name, 'seconds': wall, 'start-up': start_up,
                 'examples/s': num_examples / wall,
                 # too close to the start-up to tell (a tiny --num_examples): no figure
                 'after start-up': (num_examples / (wall - start_up)
                                    if wall > 1.5 * start_up else float('nan')),
                 'MB/s': total_bytes / wall / 1e6, 'vs in process': base / wall,
                 'all runs (s)': ', '.join(f'{t:.1f}' for t in times[name, 'full'])})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_examples', type=int, default=12000)
  parser.add_argument('--num_tars', type=int, default=12)
  parser.add_argument('--held_out', type=int, default=1000,
                      help='Held-out images for the + dedup rows (0: no such rows).')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--skip_vocabulary', action='store_true')
  parser.add_argument('--vocabulary_captions', default='1000000,4000000')
  args = parser.parse_args(argv)

  print(f'# benchmarks/prepare_speed.py {" ".join(sys.argv[1:])}  '
        f'({datetime.date.today()}, {os.cpu_count()} CPUs)')
  with tempfile.TemporaryDirectory() as scratch:
    tars, total = write_tars(os.path.join(scratch, 'tars'), args.num_examples, args.num_tars)
    tiny_tar, _ = write_tars(os.path.join(scratch, 'tiny'), 10, 1)
    held_out = None
    if args.held_out:
      held_out = os.path.join(scratch, 'held_out')
      generated_jpegs.generate_image_folder(held_out, args.held_out,
                                            first_index=args.num_examples)
    rows = convert_rows(tars, total, args.num_examples, tiny_tar, held_out, args.repeats,
                        scratch)
  print(f'\nConverter: {args.num_examples} examples in {args.num_tars} tars, '
        f'{total / 1e6:.0f} MB ({total / args.num_examples / 1e3:.0f} KB an example); '
        f'fastest of {args.repeats}.\n')
  print('| run | s | examples/s | MB/s | vs in process | start-up s (1 tar of 10) |'
        ' examples/s after start-up | all runs (s) |')
  print('|---|---|---|---|---|---|---|---|')
  for row in rows:
    print(f'| {row["row"]} | {row["seconds"]:.1f} | {row["examples/s"]:.0f} | '
          f'{row["MB/s"]:.1f} | {row["vs in process"]:.2f} | {row["start-up"]:.1f} | '
          f'{row["after start-up"]:.0f} | {row["all runs (s)"]} |')
  per_worker = {row['row']: row['after start-up'] for row in rows}
  for name in ('Beam, 1 worker', 'Beam, 1 worker + dedup'):
    if per_worker.get(name, float('nan')) == per_worker.get(name):  # not NaN
      workers = IMAGES_PER_DAY_TARGET / (per_worker[name] * SECONDS_PER_DAY)
      print(f'\n{name}: {per_worker[name]:.0f} examples/s a worker after start-up -> '
            f'{workers:.0f} workers (one a core) prepare 3 billion images in a day.')

  if not args.skip_vocabulary:
    counts = tuple(int(count) for count in args.vocabulary_captions.split(','))
    print('\nVocabulary (build_vocabulary labels, synthetic captions, the same 35 tags):\n')
    prepare_vocabulary_memory.print_table(
        prepare_vocabulary_memory.vocabulary_memory_rows(counts))


if __name__ == '__main__':
  main()
