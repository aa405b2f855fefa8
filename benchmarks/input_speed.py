"""Input pipeline throughput: the Grain pipeline vs tf.data, images/s per CPU core.

Both pipelines read the same JPEG files of an image folder and do the same work
per image: read the file, decode it to uint8 RGB, a RandomResizedCrop (area
scale config.data.crop_scale = (0.2, 1.0), aspect ratio log-uniform in
(3/4, 4/3), up to 10 attempts then a ratio-clamped centre crop, as
torchvision), a bicubic antialiased resize to image_size, a random horizontal
flip, and batching into uint8 (B, S, S, 3) images + int32 labels, in `--threads`
threads:

  grain    the real code: InputPipeline(config.data, ...) of
           stage_config('mae') with data.source='image_folder', iterated with
           next_local_numpy() (host numpy batches, no device transfer). PIL
           decode and resize (big_pretrain/data/transforms.py).
  tf.data  tf.io.read_file -> tf.io.decode_image -> the same crop distribution
           in TF ops -> tf.image.resize(bicubic, antialias=True) -> uint8 ->
           random flip -> batch -> prefetch; map(num_parallel_calls=AUTOTUNE)
           in a private thread pool of `--threads` threads.

and two reference rows: PIL decode only, and the Grain per-example function
(decode + crop + flip) called in a loop, each single-threaded; and one extra
tf.data row, decode_and_crop_jpeg, that decodes only the crop window (TF's
usual ImageNet recipe; less work than the others, shown for what it saves).

Each pipeline runs `--warmup` batches, then `--batches` timed batches; images/s
is over the timed batches. "per core" divides by min(threads, os.cpu_count());
"images/CPU-s" divides by the CPU time the whole process used in the timed
window (all threads, including the consumer's), which stays meaningful on a
shared machine. Every row runs `--repeats` times, interleaved with the others;
the table shows each row's fastest run and lists all of them.

Without `--data`, `--num_examples` JPEGs (500x375 and 375x500, quality 90) are
generated into a temporary folder of 10 class subfolders from the embedded
synthetic shapes, upscaled and overlaid with multi-scale colour texture and
noise so that they encode to realistic sizes (~70 KB).

  python benchmarks/input_speed.py                                        # ~2 min on 2 cores
  python benchmarks/input_speed.py --num_examples=600 --batches=10 --batch_size=32   # ~30 s
  python benchmarks/input_speed.py --data=/path/to/imagenet/train --threads=16
  python benchmarks/input_speed.py --step_images_per_sec=2500     # cores needed to feed that step
  python benchmarks/input_speed.py --measure_step --step_batch_size=256 --step_dtype=bfloat16
      # also times the MAE train step (benchmarks/step_speed.py) on this machine's first device

The machine may be shared: compare rows of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from big_pretrain import sharding as sharding_lib  # noqa: E402
from big_pretrain.config.defaults import stage_config  # noqa: E402
from big_pretrain.config.validation import validate_stage_config  # noqa: E402
from big_pretrain.data import augment as augment_lib  # noqa: E402
from big_pretrain.data import example_maps  # noqa: E402
from big_pretrain.data import sources  # noqa: E402
from big_pretrain.data import train_input as pipeline_lib  # noqa: E402
from big_pretrain.data import transforms  # noqa: E402

# Beside this script (its folder is on sys.path).
import step_speed as step_benchmark  # noqa: E402
from generated_jpegs import generate_image_folder  # noqa: E402

JPEG_SUFFIXES = ('.jpg', '.jpeg')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=None,
                      help='an image folder of class subfolders; default: generate JPEGs into '
                           'a temporary folder')
  parser.add_argument('--num_examples', type=int, default=2000,
                      help='JPEGs to generate when --data is not given')
  parser.add_argument('--jpeg_size', default='500x375',
                      help='WIDTHxHEIGHT of the generated JPEGs (every 4th one upright)')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='Grain num_threads = tf.data private thread pool size')
  parser.add_argument('--batches', type=int, default=30, help='timed batches per pipeline')
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches first')
  parser.add_argument('--repeats', type=int, default=2,
                      help='runs of every row, interleaved; the table shows the fastest')
  parser.add_argument('--no_decode_and_crop', action='store_true',
                      help='leave out the extra tf.data decode_and_crop_jpeg row')
  parser.add_argument('--step_images_per_sec', type=float, default=None,
                      help='the train step\'s images/s per device (e.g. '
                           'benchmarks/step_speed.py\'s images/s column), to say how many cores '
                           'feed it')
  parser.add_argument('--measure_step', action='store_true',
                      help='time the MAE train step here with benchmarks/step_speed.py '
                           '(slow on a CPU)')
  parser.add_argument('--step_variant', default='B/16')
  parser.add_argument('--step_batch_size', type=int, default=0, help='default: --batch_size')
  parser.add_argument('--step_dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(argv)
  if min(args.threads, args.batches, args.batch_size, args.repeats) < 1 or args.warmup < 0:
    parser.error('--threads, --batches, --batch_size and --repeats must be positive, '
                 '--warmup >= 0.')
  return args


# --- Data --------------------------------------------------------------------

def list_files(directory: str) -> tuple[list[str], list[int]]:
  """The image folder's files and labels, in the order ImageFolder (the Grain source) lists them."""
  source = sources.ImageFolder(directory)
  examples = [source[i] for i in range(len(source))]
  return [e['image_path'] for e in examples], [e['label'] for e in examples]


# --- Timing ------------------------------------------------------------------

class Result:

  def __init__(self, name: str, threads: int, images: int, seconds: float, cpu_seconds: float,
               batch_size: int | None):
    self.name, self.threads, self.images = name, threads, images
    self.seconds, self.cpu_seconds, self.batch_size = seconds, cpu_seconds, batch_size

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds

  @property
  def per_core(self) -> float:
    return self.images_per_second / min(self.threads, os.cpu_count())

  @property
  def cores_used(self) -> float:
    return self.cpu_seconds / self.seconds

  @property
  def images_per_cpu_second(self) -> float:
    return self.images / self.cpu_seconds if self.cpu_seconds > 0 else float('nan')


@contextlib.contextmanager
def timer():
  """Yields a dict that gets 'seconds' (wall) and 'cpu_seconds' (this process, all threads)."""
  out = {}
  times = os.times()
  start = time.perf_counter()
  yield out
  out['seconds'] = time.perf_counter() - start
  end = os.times()
  out['cpu_seconds'] = (end.user - times.user) + (end.system - times.system)


def check_batch(name: str, batch: dict, batch_size: int, image_size: int) -> None:
  image, label = batch['image'], batch['label']
  if image.shape != (batch_size, image_size, image_size, 3) or image.dtype != np.uint8:
    raise RuntimeError(f'{name}: image batch {image.dtype} {image.shape}, expected uint8 '
                       f'{(batch_size, image_size, image_size, 3)}.')
  if label.shape != (batch_size,) or label.dtype != np.int32:
    raise RuntimeError(f'{name}: label batch {label.dtype} {label.shape}, expected int32 '
                       f'({batch_size},).')


def time_batches(name: str, threads: int, next_batch, args) -> Result:
  for _ in range(args.warmup):
    check_batch(name, next_batch(), args.batch_size, args.image_size)
  with timer() as t:
    for _ in range(args.batches):
      batch = next_batch()
  check_batch(name, batch, args.batch_size, args.image_size)
  result = Result(name, threads, args.batches * args.batch_size, t['seconds'], t['cpu_seconds'],
                  args.batch_size)
  print(f'  {name}: {result.images_per_second:.1f} images/s', flush=True)
  return result


def time_per_image(name: str, function, paths: list[str], count: int) -> Result:
  """function(path) called on `count` files in order (cycling), in this thread."""
  function(paths[0])  # warm-up
  with timer() as t:
    for i in range(count):
      function(paths[i % len(paths)])
  result = Result(name, 1, count, t['seconds'], t['cpu_seconds'], None)
  print(f'  {name}: {result.images_per_second:.1f} images/s', flush=True)
  return result


# --- Grain -------------------------------------------------------------------

def grain_config(args, directory: str):
  config = stage_config('mae')
  config.batch_size = args.batch_size
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.data.update(source='image_folder', path=directory, image_size=args.image_size,
                     num_threads=args.threads)
  validate_stage_config(config)
  return config


def time_grain(args, directory: str) -> Result:
  config = grain_config(args, directory)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  pipeline = pipeline_lib.InputPipeline(config.data, global_batch_size=args.batch_size,
                                        mesh=mesh, seed=0)
  result = time_batches('grain', args.threads, pipeline.next_local_numpy, args)
  del pipeline
  gc.collect()
  time.sleep(0.5)  # let the prefetch threads see the iterator is gone
  return result


def grain_example_function(args, config, decode_at_crop_scale: bool):
  """The Grain pipeline's per-example work (decode, config.data.augment) for one path,
  the JPEG decoded at the crop's scale or whole (config.data.decode_at_crop_scale)."""
  rng = np.random.default_rng(0)
  data = config.data

  def process(path: str) -> np.ndarray:
    example = example_maps.augment_for_training(
        {'image_path': path, 'label': 0}, rng, image_size=data.image_size,
        crop_scale=tuple(data.crop_scale), augment=augment_lib.parse_augment(data.augment),
        randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
        randaugment_magnitude_std=data.randaugment_magnitude_std,
        erasing_prob=data.erasing_prob, scale_jitter=tuple(data.scale_jitter),
        decode_at_crop_scale=decode_at_crop_scale)
    return example['image']
  return process


# --- tf.data -----------------------------------------------------------------

def import_tensorflow():
  """TensorFlow for the tf.data rows, or None (saying how to get it) where it is not installed."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('No tf.data rows: TensorFlow is not installed (pip install -r requirements-tf.txt, '
          'or make install-tf).', flush=True)
    return None
  tf.config.set_visible_devices([], 'GPU')  # Input work is on the host; keep TF off the GPU.
  return tf


def tf_crop_window(tf, shape, seed, scale, ratio=(3 / 4, 4 / 3)):
  """(top, left, height, width) int32: transforms.random_resized_crop's distribution in TF ops.

  Up to 10 attempts, area uniform in `scale` of the image area and aspect ratio
  log-uniform in `ratio`, the first that fits; else a centre crop with the
  aspect ratio clamped to `ratio`. Python's round() and tf.round() both round
  half to even.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  area = height * width
  target_area = area * tf.random.stateless_uniform([10], seeds[0], scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([10], seeds[1], np.log(ratio[0]), np.log(ratio[1])))
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  offsets = tf.random.stateless_uniform([2], seeds[2])
  h, w = crop_h[first], crop_w[first]
  top = tf.floor(offsets[0] * (height - h + 1))
  left = tf.floor(offsets[1] * (width - w + 1))

  input_ratio = width / height
  fallback_w = tf.where(input_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(input_ratio < ratio[0], tf.round(width / ratio[0]), height)
  fallback_top = tf.floor((height - fallback_h) / 2)
  fallback_left = tf.floor((width - fallback_w) / 2)
  found = tf.reduce_any(fits)
  window = tf.where(found, tf.stack([top, left, h, w]),
                    tf.stack([fallback_top, fallback_left, fallback_h, fallback_w]))
  return tf.cast(window, tf.int32)


def tf_dataset(tf, paths, labels, args, crop_scale, flip: bool, decode_and_crop: bool):
  size = args.image_size

  def process(index, path, label):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    encoded = tf.io.read_file(path)
    if decode_and_crop:
      shape = tf.image.extract_jpeg_shape(encoded)
      window = tf_crop_window(tf, shape, crop_seed, crop_scale)
      image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    else:
      image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
      window = tf_crop_window(tf, tf.shape(image), crop_seed, crop_scale)
      image = tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])
    image = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if flip:
      image = tf.cond(tf.random.stateless_uniform([], flip_seed) < 0.5,
                      lambda: tf.reverse(image, axis=[1]), lambda: image)
    return {'image': image, 'label': label}

  dataset = tf.data.Dataset.from_tensor_slices(
      (tf.constant(paths), tf.constant(labels, tf.int32)))
  dataset = dataset.shuffle(len(paths), seed=0, reshuffle_each_iteration=True).repeat()
  dataset = dataset.enumerate()
  dataset = dataset.map(lambda index, example: process(index, *example),
                        num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(args.batch_size, drop_remainder=True)
  dataset = dataset.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads
  options.threading.max_intra_op_parallelism = 1  # one op = one thread, as PIL in Grain
  options.autotune.enabled = True
  options.autotune.cpu_budget = args.threads
  return dataset.with_options(options)


def tf_flip(config) -> bool:
  """Whether config.data.augment flips; the tf.data pipeline does crop and flip only."""
  names = augment_lib.parse_augment(config.data.augment)
  if 'crop' not in names or set(names) - {'crop', 'flip'}:
    raise ValueError(f'config.data.augment={config.data.augment!r}: the tf.data pipeline does'
                     ' the same work as Grain only for "crop" or "crop+flip".')
  return 'flip' in names


def time_tf(tf, name, paths, labels, args, config, decode_and_crop: bool) -> Result:
  dataset = tf_dataset(tf, paths, labels, args, tuple(config.data.crop_scale), tf_flip(config),
                       decode_and_crop)
  iterator = dataset.as_numpy_iterator()
  result = time_batches(name, args.threads, lambda: next(iterator), args)
  del iterator
  gc.collect()
  time.sleep(0.5)
  return result


# --- The train step ------------------------------------------------------------

def measure_step_images_per_second(args) -> tuple[float, str]:
  """images/s per device of the MAE train step, timed with benchmarks/step_speed.py's run_row."""
  batch_size = args.step_batch_size or args.batch_size
  step_args = step_benchmark.parse_args([
      '--objectives=mae', f'--variant={args.step_variant}', f'--batch_size={batch_size}',
      f'--image_size={args.image_size}', f'--dtype={args.step_dtype}', '--devices=1',
      '--steps=5', '--warmup=1'])
  print(f'Timing the MAE train step (ViT-{args.step_variant}, batch {batch_size}, '
        f'{args.step_dtype}) on {jax.devices()[0].device_kind}...', flush=True)
  with tempfile.TemporaryDirectory(prefix='input_benchmark_step_') as workdir:
    row = step_benchmark.run_row('mae', step_benchmark.stage_for('mae', step_args, workdir),
                                 step_args)
  return row.images_per_second, (
      f'the MAE ViT-{args.step_variant} train step measured here at {row.images_per_second:.0f} '
      f'images/s on one {jax.devices()[0].device_kind} (batch {batch_size}, {args.step_dtype})')


# --- Report ------------------------------------------------------------------

def print_table(header: list[str], rows: list[list[str]]) -> None:
  step_benchmark.print_table(header, rows)  # one table format for all benchmarks


def describe_files(paths: list[str]) -> str:
  sample = paths[:: max(1, len(paths) // 50)]
  sizes = [os.path.getsize(p) for p in sample]
  shapes = []
  for path in sample[:20]:
    with Image.open(path) as image:
      shapes.append(image.size)
  pixels = np.mean([w * h for w, h in shapes])
  return (f'{len(paths)} files, mean {np.mean(sizes) / 1e3:.0f} KB and '
          f'{pixels / 1e3:.0f} kpixels (sampled)')


def report(args, runs: dict[str, list[Result]], files: str, crop_scale: tuple[float, float],
           step_rate: float | None, step_description: str | None) -> None:
  cores = os.cpu_count()
  results = [max(rows, key=lambda r: r.images_per_second) for rows in runs.values()]
  print(f'\nInput pipeline throughput: {files}; {args.image_size} px, batch {args.batch_size}, '
        f'{args.batches} timed batches after {args.warmup}; {cores} CPU cores '
        f'(os.cpu_count()), threads {args.threads}; fastest of {args.repeats} interleaved runs')
  print('per core = images/s / min(threads, cores); cores used = process CPU time / wall time '
        'in the timed window; images/CPU-s = images / process CPU time\n')
  print_table(
      ['pipeline', 'threads', 'images/s', 'images/s per core', 'ms/batch', 'cores used',
       'images/CPU-s', 'images/s of each run'],
      [[r.name, str(r.threads), f'{r.images_per_second:.1f}', f'{r.per_core:.1f}',
        f'{r.seconds / args.batches * 1e3:.1f}' if r.batch_size else '-',
        f'{r.cores_used:.2f}', f'{r.images_per_cpu_second:.1f}',
        ', '.join(f'{x.images_per_second:.0f}' for x in runs[r.name])] for r in results])
  print('Notes:')
  print('  - grain and tf.data do the same work per image: read + full JPEG decode (libjpeg-turbo '
        'in both), the same RandomResizedCrop distribution (area scale '
        f'{crop_scale}, log-uniform aspect '
        '(3/4, 4/3), 10 attempts, clamped centre-crop fallback; different random streams), '
        'bicubic antialiased resize, flip p=0.5, uint8 (B, S, S, 3) + int32 labels.')
  print('  - Differences: PIL resizes uint8 with its own bicubic filter (a=-0.5) straight to '
        'uint8; tf.image.resize(antialias=True) (Keys cubic a=-0.5) computes float32, then '
        'round/clip/cast to uint8 (more arithmetic). Grain also applies EXIF orientation and '
        'checks for a caption .txt per image (ImageFolder), tf.decode_image does neither. '
        'Grain batches in the consumer thread; tf.data batches and prefetches in its pool.')
  print('  - The decode-only and "grain example fn" rows are one thread, no pipeline: the ceiling '
        'per core of the PIL work. "tf.data decode_and_crop" decodes only the crop window '
        '(fewer scan lines/blocks): less work than the other rows, not an equivalent pipeline.')
  print('  - The machine may be shared: when "cores used" < min(threads, cores), other processes '
        'took the rest, and images/CPU-s is the fairer per-core figure.')

  main_rows = [r for r in results if r.name in ('grain', 'tf.data')]
  print()
  if step_rate:
    source = step_description or f'a train step at {step_rate:.0f} images/s per device'
    print(f'Feeding {source}:')
    for r in main_rows:
      print(f'  {r.name}: {step_rate / r.per_core:.2f} cores per device at '
            f'{r.per_core:.1f} images/s per core ({step_rate / r.images_per_cpu_second:.2f} at '
            f'{r.images_per_cpu_second:.1f} images/CPU-s)')
  else:
    print('Cores needed per 1000 images/s of train step (pass --step_images_per_sec=N, e.g. '
          "benchmarks/step_speed.py's images/s per device for ViT-B/16 MAE on the accelerator, or "
          '--measure_step):')
    for r in main_rows:
      print(f'  {r.name}: {1000 / r.per_core:.1f} cores at {r.per_core:.1f} images/s per core '
            f'({1000 / r.images_per_cpu_second:.1f} at {r.images_per_cpu_second:.1f} '
            'images/CPU-s)')


def main(argv=None):
  args = parse_args(argv)
  with contextlib.ExitStack() as stack:
    if args.data:
      directory = args.data
    else:
      directory = stack.enter_context(tempfile.TemporaryDirectory(prefix='input_benchmark_'))
      start = time.perf_counter()
      generate_image_folder(directory, args.num_examples,
                            size=tuple(int(v) for v in args.jpeg_size.split('x')))
      print(f'Generated {args.num_examples} JPEGs in {directory} '
            f'({time.perf_counter() - start:.1f} s)', flush=True)
    paths, labels = list_files(directory)
    files = describe_files(paths)
    config = grain_config(args, directory)
    count = min(len(paths), args.batches * args.batch_size)

    tf = import_tensorflow()
    all_jpeg = all(p.lower().endswith(JPEG_SUFFIXES) for p in paths)
    runs: dict[str, list[Result]] = {}
    for repeat in range(args.repeats):
      print(f'Run {repeat + 1} of {args.repeats}', flush=True)
      results = [
          time_per_image('PIL decode only', transforms.decode_image, paths, count),
          time_per_image('grain example fn, full decode',
                         grain_example_function(args, config, False), paths, count),
          time_per_image('grain example fn', grain_example_function(args, config, True),
                         paths, count),
          time_grain(args, directory)]
      if tf is not None:
        results.append(time_tf(tf, 'tf.data', paths, labels, args, config, decode_and_crop=False))
      if tf is not None and not args.no_decode_and_crop and all_jpeg:
        results.append(time_tf(tf, 'tf.data decode_and_crop', paths, labels, args, config,
                               decode_and_crop=True))
      for result in results:
        runs.setdefault(result.name, []).append(result)

    step_rate, step_description = args.step_images_per_sec, None
    if args.measure_step:
      step_rate, step_description = measure_step_images_per_second(args)
    report(args, runs, files, tuple(config.data.crop_scale), step_rate, step_description)


if __name__ == '__main__':
  main()
