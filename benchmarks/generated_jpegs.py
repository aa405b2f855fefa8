"""Image folders of generated JPEGs that encode to realistic sizes, for the input benchmarks.

The embedded synthetic shapes, upscaled (500x375 by default, every 4th one
upright) and overlaid with multi-scale colour texture and noise, saved at
quality 90 (~70 KB each) into class subfolders: what benchmarks/input_speed.py
and loop_speed.py read when no --data is given.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
from PIL import Image

from big_pretrain.data import sources

NUM_CLASSES = 10


def _texture_image(shapes: sources.SyntheticShapes, index: int,
                   size: tuple[int, int] = (500, 375)) -> Image.Image:
  """A `size` (width, height; every 4th one upright) RGB image: a synthetic shape under colour
  texture + noise."""
  rng = np.random.default_rng((1, index))
  width, height = size[::-1] if index % 4 == 0 else size
  base = Image.fromarray(shapes[index % len(shapes)]['image']).resize(
      (width, height), Image.Resampling.BICUBIC)
  image = np.asarray(base, np.int16).copy()
  # Colour noise at 4 scales (cells across the width, amplitude), then pixel noise.
  for cells, amplitude in ((8, 90), (32, 60), (128, 40), (250, 30)):
    small = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), np.uint8)
    up = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC),
                    np.int16)
    image += (up - 128) * amplitude // 256
  image += rng.integers(-12, 13, image.shape, np.int16)
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def generate_image_folder(directory: str, num_examples: int,
                          size: tuple[int, int] = (500, 375), first_index: int = 0) -> None:
  """num_examples JPEGs (quality 90) of `size` in NUM_CLASSES class subfolders of directory:
  images first_index, first_index + 1, ... (another first_index: other images)."""
  shapes = sources.SyntheticShapes(min(first_index + num_examples, 1000), image_size=128,
                                   seed=0)
  for label in range(NUM_CLASSES):
    os.makedirs(os.path.join(directory, f'class_{label:02d}'), exist_ok=True)

  def write(index: int) -> None:
    path = os.path.join(directory, f'class_{index % NUM_CLASSES:02d}', f'{index:06d}.jpg')
    _texture_image(shapes, index, size).save(path, format='JPEG', quality=90)

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(write, range(first_index, first_index + num_examples)))
