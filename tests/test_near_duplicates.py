"""near_duplicates: perceptual hashes find re-encoded, resized and cropped copies of held-out
images and no unrelated image, nearest() is exact, and what training cannot decode is not
hashed.

The test set (helpers.near_duplicate_images): 60 distinct 96x96 held-out JPEGs, 8 variants
of each, 300 unrelated images. Hamming distances of 64 bits measured here (pytest -s prints
them; distances are even, since each hash has 32 bits set):
  farthest variant from its original: JPEG quality 40: 6, quality 75: 2, PNG: 2, resized
  0.5x: 4, 1.7x: 4; crops of 3% per side: centre 12, top-left corner 10, bottom-right 12
  (every crop's nearest held-out image is still its original);
  nearest unrelated image to a held-out one: 14; nearest two held-out images: 20.
DEFAULT_MAX_DISTANCE = 8 lies 2 bits beyond the re-encoded/resized copies and 6 short of the
unrelated images (it is set low for large held-out sets: near_duplicates.py says why); some
crops reach past it.
"""

import importlib.util
import io

import numpy as np
from PIL import Image
import pytest

from big_pretrain.data import transforms
from big_pretrain.data.prepare import near_duplicates
from big_pretrain.data.prepare.near_duplicates import (DEFAULT_MAX_DISTANCE, UndecodableImage,
                                                       decoded_for_hash, hashes_array, nearest,
                                                       perceptual_hash)
from helpers.images import encoded_image
from helpers.near_duplicate_images import (CROP_KINDS, KINDS_ALWAYS_FOUND, distinct_images,
                                           variants)

requires_imagehash = pytest.mark.skipif(
    importlib.util.find_spec('imagehash') is None,
    reason='perceptual hashes need imagehash: pip install -r requirements-beam.txt')

HELD_OUT_COUNT = 60
UNRELATED_COUNT = 300
HELD_OUT_SEED = 0
UNRELATED_SEED = 1
# Distances are even (each hash has 32 of its 64 bits set): the smallest margin is 2.
MARGIN = 2
# Crops within DEFAULT_MAX_DISTANCE (8), at least: 85-90% by kind over 300 images, 83-93% over
# this test's 60 (one image of 60 is 1.7%).
MIN_CROPS_FOUND = 0.8


@pytest.fixture(scope='module')
def test_set():
  """The held-out JPEGs, their hashes, the hashes of their variants by kind, and of the
  unrelated images."""
  held_out = distinct_images(HELD_OUT_COUNT, HELD_OUT_SEED)
  variant_hashes = {}
  for original in held_out:
    for kind, encoded in variants(original).items():
      variant_hashes.setdefault(kind, []).append(perceptual_hash(encoded))
  unrelated = distinct_images(UNRELATED_COUNT, UNRELATED_SEED)
  return {
      'held_out': held_out,
      'held_out_hashes': hashes_array([perceptual_hash(image) for image in held_out]),
      'variant_hashes': {kind: hashes_array(hashes) for kind, hashes in variant_hashes.items()},
      'unrelated_hashes': hashes_array([perceptual_hash(image) for image in unrelated]),
  }


def _distances_to_originals(test_set, kind) -> np.ndarray:
  return np.bitwise_count(test_set['variant_hashes'][kind] ^ test_set['held_out_hashes'])


def _min_unrelated_distance(test_set) -> int:
  return int(nearest(test_set['unrelated_hashes'], test_set['held_out_hashes'])[1].min())


@requires_imagehash
@pytest.mark.parametrize('kind', KINDS_ALWAYS_FOUND)
@pytest.mark.beam
def test_every_re_encoded_or_resized_copy_is_found(test_set, kind):
  indices, distances = nearest(test_set['variant_hashes'][kind], test_set['held_out_hashes'])
  np.testing.assert_array_equal(indices, np.arange(HELD_OUT_COUNT))
  assert distances.max() <= DEFAULT_MAX_DISTANCE, kind


@requires_imagehash
@pytest.mark.parametrize('kind', CROP_KINDS)
@pytest.mark.beam
def test_crops_are_nearest_their_original_and_mostly_found(test_set, kind):
  indices, distances = nearest(test_set['variant_hashes'][kind], test_set['held_out_hashes'])
  np.testing.assert_array_equal(indices, np.arange(HELD_OUT_COUNT))
  assert np.mean(distances <= DEFAULT_MAX_DISTANCE) >= MIN_CROPS_FOUND, np.sort(distances)


@requires_imagehash
@pytest.mark.beam
def test_no_unrelated_image_is_a_near_duplicate(test_set):
  assert _min_unrelated_distance(test_set) > DEFAULT_MAX_DISTANCE
  held_out = test_set['held_out_hashes']
  between_held_out = np.bitwise_count(held_out[:, np.newaxis] ^ held_out[np.newaxis, :])
  np.fill_diagonal(between_held_out, 64)
  assert between_held_out.min() > DEFAULT_MAX_DISTANCE  # the generator's images are distinct


@requires_imagehash
@pytest.mark.beam
def test_threshold_has_a_margin_on_both_sides(test_set):
  """Prints the measured distances (pytest -s) that DEFAULT_MAX_DISTANCE is chosen from."""
  farthest = {kind: int(_distances_to_originals(test_set, kind).max())
              for kind in test_set['variant_hashes']}
  nearest_unrelated = _min_unrelated_distance(test_set)
  print(f'\nFarthest variant from its original, by kind: {farthest}')
  print(f'Nearest unrelated image to a held-out one: {nearest_unrelated}; '
        f'DEFAULT_MAX_DISTANCE: {DEFAULT_MAX_DISTANCE}')
  farthest_always_found = max(farthest[kind] for kind in KINDS_ALWAYS_FOUND)
  assert farthest_always_found + MARGIN <= DEFAULT_MAX_DISTANCE
  assert DEFAULT_MAX_DISTANCE + MARGIN <= nearest_unrelated


def _brute_force_nearest(query, reference):
  indices, distances = [], []
  for q in query:
    bit_counts = [bin(int(q) ^ int(r)).count('1') for r in reference]
    best = min(bit_counts, default=near_duplicates.NO_REFERENCE_DISTANCE)
    indices.append(bit_counts.index(best) if bit_counts else -1)
    distances.append(best)
  return indices, distances


@pytest.mark.parametrize(
    'query_count, reference_count, random_bits, pairs_per_block',
    [(50, 40, 64, None),  # one block
     (50, 40, 3, None),  # few distinct hashes: ties everywhere
     (37, 23, 4, 10),  # reference blocks of 10, one query each: across block boundaries
     (37, 23, 4, 50),  # reference in one block, queries in blocks of 2
     (7, 0, 64, None),  # empty reference
     (0, 5, 64, None)])  # no query
def test_nearest_matches_brute_force(monkeypatch, query_count, reference_count, random_bits,
                                     pairs_per_block):
  if pairs_per_block:
    monkeypatch.setattr(near_duplicates, '_PAIRS_PER_BLOCK', pairs_per_block)
  rng = np.random.default_rng(random_bits)
  high_bits = rng.integers(0, 2**63, dtype=np.uint64) << np.uint64(1)  # shared by all hashes

  def random_hashes(count):
    low_bits = rng.integers(0, 2**random_bits, count, dtype=np.uint64, endpoint=False)
    return low_bits if random_bits == 64 else high_bits | low_bits

  query, reference = random_hashes(query_count), random_hashes(reference_count)
  indices, distances = nearest(query, reference)
  expected_indices, expected_distances = _brute_force_nearest(query, reference)
  assert indices.tolist() == expected_indices
  assert distances.tolist() == expected_distances
  assert indices.dtype == distances.dtype == np.int64


def test_nearest_takes_uint64_arrays_only():
  with pytest.raises(ValueError, match='uint64'):
    nearest(np.array([1, 2], dtype=np.int64), hashes_array([1]))
  with pytest.raises(ValueError, match='uint64'):
    nearest(hashes_array([1]), hashes_array([1, 2]).reshape(1, 2))


def test_hashes_array_holds_every_64_bit_hash():
  hashes = [0, 1, 2**63, 2**64 - 1]
  array = hashes_array(hashes)
  assert array.dtype == np.uint64 and array.tolist() == hashes
  assert hashes_array([]).shape == (0,)
  assert nearest(array, array)[1].tolist() == [0, 0, 0, 0]


def _undecodable_cases():
  """(name, bytes, whether PIL decodes them): the damage training meets, and valid images."""
  small_jpeg = distinct_images(1, seed=2)[0]
  # 256x256: decoded_for_hash decodes it at 1/4 scale (draft), training at full scale.
  large_jpeg = distinct_images(1, seed=2, size=256)[0]
  with Image.open(io.BytesIO(small_jpeg)) as image:
    pixels = np.asarray(image.convert('RGB'))
  png = encoded_image(pixels, 'PNG')
  return [
      ('jpeg', small_jpeg, True),
      ('jpeg_large', large_jpeg, True),
      ('png', png, True),
      ('webp', encoded_image(pixels, 'WEBP'), True),
      ('jpeg_progressive', encoded_image(pixels, 'JPEG', progressive=True), True),
      ('jpeg_cut_in_half', small_jpeg[:len(small_jpeg) // 2], False),
      ('jpeg_large_cut_in_half', large_jpeg[:len(large_jpeg) // 2], False),
      # Only the end-of-image marker missing: Pillow 13 raises "image file is truncated".
      ('jpeg_without_last_2_bytes', small_jpeg[:-2], False),
      ('jpeg_large_without_last_2_bytes', large_jpeg[:-2], False),
      ('png_cut_short', png[:len(png) // 2], False),
      ('zero_bytes', b'', False),
      ('random_bytes', np.random.default_rng(3).bytes(2000), False),
  ]


def _decodes(decode) -> bool:
  try:
    decode()
  except (transforms.CorruptImageError, UndecodableImage):
    return False
  return True


@pytest.mark.parametrize('name, encoded, decodable', _undecodable_cases(),
                         ids=[case[0] for case in _undecodable_cases()])
def test_decodable_exactly_where_training_decodes(name, encoded, decodable):
  del name
  training_decodes = _decodes(lambda: transforms.decode_image_bytes(encoded, 'test'))
  training_crop_decodes = _decodes(lambda: transforms.decode_random_resized_crop(
      encoded, 'test', np.random.default_rng(0), 16))
  hash_decodes = _decodes(lambda: decoded_for_hash(encoded))
  assert (training_decodes, training_crop_decodes, hash_decodes) == (decodable,) * 3
  if not decodable and importlib.util.find_spec('imagehash'):
    with pytest.raises(UndecodableImage):
      perceptual_hash(encoded)


@requires_imagehash
@pytest.mark.parametrize('size', [96, 512])
@pytest.mark.beam
def test_same_bytes_give_the_same_64_bit_hash(size):
  import imagehash  # pylint: disable=import-outside-toplevel
  for encoded in distinct_images(3, seed=4, size=size):
    first = perceptual_hash(encoded)
    assert first == perceptual_hash(encoded)
    assert 0 <= first < 2**64
    # The bit order of imagehash's hex string: the hashes are interchangeable.
    assert first == int(str(imagehash.phash(decoded_for_hash(encoded))), 16)


@requires_imagehash
@pytest.mark.beam
def test_reduced_scale_decode_hashes_like_the_full_decode():
  import imagehash  # pylint: disable=import-outside-toplevel
  for encoded in distinct_images(5, seed=5, size=512):
    assert decoded_for_hash(encoded).size == (64, 64)  # decoded at 1/8
    with Image.open(io.BytesIO(encoded)) as image:
      full_decode_hash = int(str(imagehash.phash(image.convert('L'))), 16)
    assert bin(perceptual_hash(encoded) ^ full_decode_hash).count('1') <= 2 * MARGIN


@requires_imagehash
@pytest.mark.beam
def test_transparent_pixels_are_hashed_as_white():
  rng = np.random.default_rng(6)
  with Image.open(io.BytesIO(distinct_images(1, seed=6)[0])) as image:
    rgb = np.asarray(image.convert('RGB'))
  opaque = np.zeros(rgb.shape[:2], dtype=bool)
  opaque[20:70, 10:60] = True
  # What lies under the transparent pixels is noise: unseen, so unhashed.
  under_transparent = rng.integers(0, 256, rgb.shape, dtype=np.uint8)
  rgba = np.dstack([np.where(opaque[..., None], rgb, under_transparent),
                    np.where(opaque, 255, 0).astype(np.uint8)])
  on_white = np.where(opaque[..., None], rgb, 255).astype(np.uint8)
  assert perceptual_hash(encoded_image(rgba, 'PNG')) == perceptual_hash(
      encoded_image(on_white, 'PNG'))


@requires_imagehash
@pytest.mark.beam
def test_exif_orientation_is_applied():
  original = distinct_images(1, seed=7)[0]
  with Image.open(io.BytesIO(original)) as image:
    # Stored turned 90 degrees anticlockwise, with the tag (6) that tells viewers to turn it
    # back clockwise.
    stored = image.convert('RGB').transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  with_tag, without_tag = io.BytesIO(), io.BytesIO()
  stored.save(with_tag, format='JPEG', quality=90, exif=exif.tobytes())
  stored.save(without_tag, format='JPEG', quality=90)
  distance = lambda encoded: bin(perceptual_hash(original) ^ perceptual_hash(encoded)).count('1')
  assert distance(with_tag.getvalue()) <= DEFAULT_MAX_DISTANCE
  assert distance(without_tag.getvalue()) > DEFAULT_MAX_DISTANCE
