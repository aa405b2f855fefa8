"""Perceptual hashes of images, and the nearest held-out hash of each training image.

The converter drops training images that are near-duplicates of held-out (evaluation)
images, as MAWS and SWAG did: the same picture re-encoded, resized or slightly cropped
must not be trained on and then evaluated. An image's hash is the 64-bit DCT pHash
(imagehash.phash); two images are near-duplicates when their hashes differ in at most
DEFAULT_MAX_DISTANCE bits.

Determinism: the same bytes always give the same hash on one machine. Across machines,
PIL's decode and LANCZOS resize are integer (fixed-point) arithmetic (libjpeg's IDCT
differs only between libjpeg builds), but scipy's DCT is float64, and each bit compares a
coefficient with the median of the 64: bits can flip on another CPU or scipy build only
where coefficients equal that median to within rounding, i.e. two bits now and then, far
inside DEFAULT_MAX_DISTANCE. So compare hashes by distance, never for equality.

imagehash (requirements-beam.txt) is imported when the first hash is computed, so that
importing this module, and matching hashes, need only numpy and PIL.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

# Measured on synthetic 96x96 images (tests/helpers/near_duplicate_images.py); distances are
# even, since each hash has 32 of its 64 bits set. The farthest copy from its original, of
# 500 (of the test's 60): JPEG quality 40: 8 (6), quality 75: 4 (2), PNG: 2 (2), resized 0.5x:
# 4 (4), 1.7x: 6 (4). Crops move content against the frame, what pHash is least robust to:
# within 10 are 99-100% of crops of 2% per side, 95-97% at 3%, 81-87% at 4%, 57-66% at 5%.
# Unrelated images: the nearest of 60 x 300 pairs is 14; of 24.5 million pairs, none within
# 6 and a fraction 3.7e-7 within 8, 2.1e-6 within 10, 1.2e-5 within 12. On the test set,
# 10 would lie 4 bits from both the re-encoded/resized copies and the unrelated images, and
# find most small crops. But false matches grow with the held-out set: a training image is
# dropped wrongly with probability about (held-out images) x 2e-6 at 10, x 4e-7 at 8 (on
# these synthetic images; not measured on photos): against 50,000 held-out images (an
# ImageNet val) that is ~10% of the training data at 10, ~2% at 8. Hence 8: every
# re-encoded and resized copy is still found (farthest: 8 of 500), and 85-90% of 3% crops
# (of 300: centre 90%, corners 85% and 88%); --max_distance=10 finds more crops and drops
# more wrongly, 6 the reverse. `--dedup=list` shows what a threshold would drop.
DEFAULT_MAX_DISTANCE = 8

HASH_BITS = 64
# nearest()'s distance where there is no reference hash: more than any two hashes differ.
NO_REFERENCE_DISTANCE = HASH_BITS + 1

# JPEGs are decoded by libjpeg's scaled IDCT at 1/2, 1/4 or 1/8 of their size, as long as
# both sides stay at least this big: pHash resizes to 32x32, so twice that loses nothing.
_DRAFT_SIDE = 64
# (query, reference) pairs compared at once in nearest(): 8 bytes of XOR and 1 of bit
# count each, so about 36 MB of temporaries.
_PAIRS_PER_BLOCK = 1 << 22


class UndecodableImage(ValueError):
  """The bytes are not an image PIL can decode whole (truncated, empty, not an image)."""


def decoded_for_hash(encoded: bytes) -> Image.Image:
  """The greyscale image the hash of `encoded` is computed from; raises UndecodableImage.

  Decodes the whole image, so a file that training would skip as undecodable
  (transforms.decode_image_bytes: a truncated JPEG, one missing only its end marker, a
  PNG cut short, empty or random bytes) fails here too; but a JPEG at 1/2 to 1/8 of its
  size (PIL's draft mode) and in greyscale, for a fraction of the work. As in training,
  the EXIF orientation is applied and transparency composited onto white.
  """
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      image.draft('L', (_DRAFT_SIDE, _DRAFT_SIDE))  # JPEG only; other formats ignore it.
      image.load()  # PIL decodes lazily: force it so truncated files fail here.
      return _as_greyscale(ImageOps.exif_transpose(image))
  # Catch-all on purpose, as transforms._decode: PIL's plugins raise OSError, SyntaxError,
  # struct.error, IndexError, DecompressionBombError... on malformed data.
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise UndecodableImage(f'{type(error).__name__}: {error}') from error


def perceptual_hash(encoded: bytes) -> int:
  """The 64-bit DCT pHash of the image `encoded`, as an int in [0, 2**64).

  imagehash.phash: 32x32 greyscale (LANCZOS), 2-D DCT, the top-left 8x8 coefficients, each
  bit set where the coefficient is above their median; the first (row-major) bit is the
  most significant, as in imagehash's hex string. Raises UndecodableImage.
  """
  import imagehash  # pylint: disable=g-import-not-at-top  # see the module docstring
  bits = imagehash.phash(decoded_for_hash(encoded)).hash
  return int.from_bytes(np.packbits(bits.ravel()).tobytes(), 'big')


def hashes_array(hashes: Sequence[int]) -> np.ndarray:
  """`hashes` (ints in [0, 2**64)) as a 1-D uint64 array, for nearest()."""
  return np.array(list(hashes), dtype=np.uint64).reshape(-1)


def nearest(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each hash in `query`, its nearest hash in `reference` by Hamming distance.

  Args:
    query: 1-D uint64 hashes (hashes_array).
    reference: 1-D uint64 hashes, e.g. of the held-out images.

  Returns:
    (indices, distances), int64 arrays shaped like `query`: the index in `reference` of the
    nearest hash (the lowest on ties) and its distance in bits. With `reference` empty,
    every index is -1 and every distance NO_REFERENCE_DISTANCE (65).
  """
  query = _checked_hashes(query, 'query')
  reference = _checked_hashes(reference, 'reference')
  indices = np.full(query.shape, -1, dtype=np.int64)
  distances = np.full(query.shape, NO_REFERENCE_DISTANCE, dtype=np.int64)
  if not len(query) or not len(reference):
    return indices, distances
  reference_block = min(len(reference), _PAIRS_PER_BLOCK)
  query_block = max(1, _PAIRS_PER_BLOCK // reference_block)
  xor = np.empty((min(query_block, len(query)), reference_block), dtype=np.uint64)
  bit_counts = np.empty(xor.shape, dtype=np.uint8)
  for query_start in range(0, len(query), query_block):
    queries = query[query_start:query_start + query_block, np.newaxis]
    best_index = indices[query_start:query_start + query_block]  # views: updated in place
    best_distance = distances[query_start:query_start + query_block]
    # Reference blocks in order, replaced only by a strictly nearer one: ties keep the
    # lowest index, as argmin does within a block.
    for reference_start in range(0, len(reference), reference_block):
      references = reference[np.newaxis, reference_start:reference_start + reference_block]
      shape = (len(queries), references.shape[1])
      block_xor, block_counts = xor[:shape[0], :shape[1]], bit_counts[:shape[0], :shape[1]]
      np.bitwise_xor(queries, references, out=block_xor)
      np.bitwise_count(block_xor, out=block_counts)
      block_index = np.argmin(block_counts, axis=1)
      block_distance = block_counts[np.arange(shape[0]), block_index].astype(np.int64)
      nearer = block_distance < best_distance
      best_index[nearer] = block_index[nearer] + reference_start
      best_distance[nearer] = block_distance[nearer]
  return indices, distances


def _checked_hashes(hashes: np.ndarray, name: str) -> np.ndarray:
  hashes = np.asarray(hashes)
  if hashes.dtype != np.uint64 or hashes.ndim != 1:
    raise ValueError(f'{name}: expected a 1-D uint64 array of hashes (hashes_array), got '
                     f'{hashes.dtype} of shape {hashes.shape}.')
  return hashes


def _as_greyscale(image: Image.Image) -> Image.Image:
  """`image` in mode L, from what training would see: transparency composited onto white
  (transforms._as_rgb_image), palette and CMYK through RGB."""
  if image.mode in ('L', 'RGB'):
    return image.convert('L')
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA'):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return image.convert('RGB').convert('L')
