"""Image files for the data tests: random pixels, encoded images, broken files, an image folder."""

import io

import numpy as np
from PIL import Image

VALID_IMAGES_PER_CLASS = 4  # in write_image_folder_with_broken_files's folder


def random_pixels(seed, shape=(20, 24, 3)):
  """uint8 pixels, uniform over 0..255, drawn from np.random.default_rng(seed)."""
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded_image(pixels, image_format, **save_options):
  """`pixels` encoded by PIL as `image_format` ('JPEG', 'PNG', 'WEBP', ...)."""
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format, **save_options)
  return buffer.getvalue()


def truncated_jpeg_bytes(size=(48, 40)):
  """A (width, height) = `size` JPEG cut in half: its header is intact, so only decoding
  the pixels fails."""
  data = encoded_image(random_pixels(0, (size[1], size[0], 3)), 'JPEG', quality=90)
  return data[:len(data) // 2]


def write_image_folder_with_broken_files(root):
  """2 classes x VALID_IMAGES_PER_CLASS valid images (PNG/JPEG, RGB/grey/RGBA, various
  sizes), a caption, a non-image file and 2 broken images, under `root`; returns `root`."""
  rng = np.random.default_rng(0)
  for class_name in ('cats', 'dogs'):
    (root / class_name).mkdir(parents=True)
    for i in range(VALID_IMAGES_PER_CLASS):
      pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
      image = Image.fromarray(pixels)
      if i == 1:
        image = image.convert('L')
      if i == 2:
        image = image.convert('RGBA')
      image.save(root / class_name / f'{class_name}{i}.{"jpg" if i == 0 else "png"}')
  (root / 'cats' / 'cats0.txt').write_text('a fluffy cat #cat #cute\n')
  (root / 'cats' / 'notes.md').write_text('not an image')
  (root / 'dogs' / 'broken.jpg').write_bytes(rng.bytes(300))
  (root / 'dogs' / 'truncated.jpg').write_bytes(truncated_jpeg_bytes())
  return root
