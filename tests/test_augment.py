"""Tests for big_pretrain.data.augment: RandAugment, random erasing, scale jitter, the spec."""

import collections

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest

from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data import augment
from big_pretrain.data import train_input
from helpers.batches import first_devices_mesh, small_data_config
from helpers.tiny_config import tiny_mae_config

FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean hparam.
BICUBIC = Image.Resampling.BICUBIC


def textured_image(height=48, width=40, seed=0):
  """Noise over a gradient: every op changes it, and height != width catches swapped axes."""
  rng = np.random.default_rng(seed)
  gradient = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
  noise = rng.integers(0, 60, (height, width, 3))
  return np.clip(gradient + noise, 0, 255).astype(np.uint8)


def default_settings(**overrides):
  settings = dict(image_size=32, crop_scale=(0.2, 1.0), randaugment_ops=2,
                  randaugment_magnitude=9.0, randaugment_magnitude_std=0.5, erasing_prob=0.25,
                  scale_jitter=(0.5, 2.0))
  settings.update(overrides)
  return settings


# --- The spec -------------------------------------------------------------------

def test_parse_augment_keeps_order_and_accepts_empty():
  assert augment.parse_augment('crop+flip') == ('crop', 'flip')
  assert augment.parse_augment('scale_jitter + crop+randaugment+erasing') == (
      'scale_jitter', 'crop', 'randaugment', 'erasing')
  assert augment.parse_augment('') == ()


def test_parse_augment_rejects_unknown_name_naming_key_name_and_valid_names():
  with pytest.raises(ValueError) as error:
    augment.parse_augment('crop+blur')
  message = str(error.value)
  assert 'config.data.augment' in message and "'blur'" in message
  assert all(name in message for name in augment.AUGMENT_NAMES)


@pytest.mark.parametrize('spec, match', [('crop+scale_jitter', 'before crop'),
                                         ('flip+crop+flip', 'more than once'),
                                         ('crop++flip', "unknown transform ''")])
def test_parse_augment_rejects_bad_order_repeats_and_empty_names(spec, match):
  with pytest.raises(ValueError, match=match) as error:
    augment.parse_augment(spec)
  assert 'config.data.augment' in str(error.value)


@pytest.mark.parametrize('key, value', [('erasing_prob', 1.5), ('randaugment_ops', -1),
                                        ('randaugment_magnitude', 11.0),
                                        ('randaugment_magnitude_std', -0.1),
                                        ('scale_jitter', (2.0, 0.5))])
def test_bad_settings_name_their_config_key(key, value):
  config = tiny_mae_config()  # the settings are checked once, by config validation
  config.data[key] = value
  with pytest.raises(ValueError, match=f'config.data.{key}='):
    validate_stage_config(config)


@pytest.mark.parametrize('spec', ['', 'crop', 'flip', 'randaugment', 'erasing', 'scale_jitter',
                                  'scale_jitter+crop', 'crop+flip+randaugment+erasing'])
def test_every_spec_gives_image_size_uint8(spec):
  image = textured_image(50, 70)
  out = augment.augment_image(image, np.random.default_rng(0), augment.parse_augment(spec),
                              **default_settings())
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_without_crop_or_scale_jitter_the_image_is_centre_cropped_first():
  image = textured_image(50, 70)
  out = augment.augment_image(image, np.random.default_rng(0), (), **default_settings())
  expected = Image.fromarray(image).resize((32, 32), BICUBIC, box=(10, 0, 60, 50))
  np.testing.assert_array_equal(out, np.asarray(expected))


# --- RandAugment ops: timm's level -> argument, then the same PIL call ------------

def _affine(matrix):
  return lambda image, arg: image.transform(image.size, Image.Transform.AFFINE, matrix(image, arg),
                                            resample=BICUBIC, fillcolor=FILL)


# What timm calls for each op (auto_augment.py's NAME_TO_OP functions), written out here.
DIRECT_PIL_CALL = {
    'AutoContrast': lambda image, arg: ImageOps.autocontrast(image),
    'Equalize': lambda image, arg: ImageOps.equalize(image),
    'Invert': lambda image, arg: ImageOps.invert(image),
    'Rotate': lambda image, arg: image.rotate(arg, resample=BICUBIC, fillcolor=FILL),
    'PosterizeIncreasing': lambda image, arg: ImageOps.posterize(image, arg),
    'SolarizeIncreasing': lambda image, arg: ImageOps.solarize(image, arg),
    'SolarizeAdd': lambda image, arg: image.point(
        [min(255, v + arg) if v < 128 else v for v in range(256)] * 3),
    'ColorIncreasing': lambda image, arg: ImageEnhance.Color(image).enhance(arg),
    'ContrastIncreasing': lambda image, arg: ImageEnhance.Contrast(image).enhance(arg),
    'BrightnessIncreasing': lambda image, arg: ImageEnhance.Brightness(image).enhance(arg),
    'SharpnessIncreasing': lambda image, arg: ImageEnhance.Sharpness(image).enhance(arg),
    'ShearX': _affine(lambda image, arg: (1, arg, 0, 0, 1, 0)),
    'ShearY': _affine(lambda image, arg: (1, 0, 0, arg, 1, 0)),
    'TranslateXRel': _affine(lambda image, arg: (1, 0, arg * image.size[0], 0, 1, 0)),
    'TranslateYRel': _affine(lambda image, arg: (1, 0, 0, 0, 1, arg * image.size[1])),
}

# timm's level functions at level 9: the argument, or for signed ops the two it can take.
LEVEL_9_ARGUMENTS = {
    'AutoContrast': {None}, 'Equalize': {None}, 'Invert': {None},
    'Rotate': {27.0, -27.0},                 # 9/10 * 30 degrees
    'PosterizeIncreasing': {1},              # 4 - int(9/10 * 4) bits kept
    'SolarizeIncreasing': {26},              # 256 - int(9/10 * 256)
    'SolarizeAdd': {99},                     # int(9/10 * 110)
    'ColorIncreasing': {1.81, 0.19},         # 1 +- 9/10 * 0.9
    'ContrastIncreasing': {1.81, 0.19},
    'BrightnessIncreasing': {1.81, 0.19},
    'SharpnessIncreasing': {1.81, 0.19},
    'ShearX': {0.27, -0.27},                 # 9/10 * 0.3
    'ShearY': {0.27, -0.27},
    'TranslateXRel': {0.405, -0.405},        # 9/10 * 0.45 of the width
    'TranslateYRel': {0.405, -0.405},
}


def test_the_op_list_is_timms_increasing_list():
  assert augment.RAND_AUGMENT_OPS == tuple(DIRECT_PIL_CALL) == tuple(LEVEL_9_ARGUMENTS)
  assert augment.MEAN_PIXEL == FILL


@pytest.mark.parametrize('name', augment.RAND_AUGMENT_OPS)
def test_op_at_level_9_is_the_pil_call_with_timms_argument(name):
  arguments = {augment.op_argument(name, 9.0, np.random.default_rng(seed)) for seed in range(40)}
  rounded = {None if arg is None else round(arg, 9) for arg in arguments}
  assert rounded == LEVEL_9_ARGUMENTS[name]  # Both signs appear for the signed ops.
  image = Image.fromarray(textured_image())
  for argument in arguments:
    np.testing.assert_array_equal(np.asarray(augment.apply_op(image, name, argument)),
                                  np.asarray(DIRECT_PIL_CALL[name](image, argument)))


@pytest.mark.parametrize('name', augment.RAND_AUGMENT_OPS)
@pytest.mark.parametrize('level', [0.0, 10.0])
def test_every_op_runs_at_both_ends_of_the_scale(name, level):
  image = Image.fromarray(textured_image())
  argument = augment.op_argument(name, level, np.random.default_rng(0))
  out = np.asarray(augment.apply_op(image, name, argument))
  assert out.shape == np.asarray(image).shape and out.dtype == np.uint8


def test_level_arguments_at_the_ends_of_the_scale():
  rng = np.random.default_rng(0)
  assert augment.op_argument('PosterizeIncreasing', 0.0, rng) == 4
  assert augment.op_argument('PosterizeIncreasing', 10.0, rng) == 0
  assert augment.op_argument('SolarizeIncreasing', 0.0, rng) == 256  # Nothing inverted.
  assert augment.op_argument('SolarizeIncreasing', 10.0, rng) == 0
  assert augment.op_argument('SolarizeAdd', 10.0, rng) == 110
  assert augment.op_argument('BrightnessIncreasing', 0.0, rng) == 1.0  # Unchanged.
  assert abs(augment.op_argument('Rotate', 10.0, rng)) == 30.0


def test_pixel_ops_by_hand():
  image = textured_image()
  pil_image = Image.fromarray(image)
  as_int = image.astype(np.int32)
  apply = lambda name, arg: np.asarray(augment.apply_op(pil_image, name, arg)).astype(np.int32)
  np.testing.assert_array_equal(apply('Invert', None), 255 - as_int)
  np.testing.assert_array_equal(apply('SolarizeIncreasing', 26),
                                np.where(as_int >= 26, 255 - as_int, as_int))
  np.testing.assert_array_equal(apply('PosterizeIncreasing', 1), as_int & 0x80)
  np.testing.assert_array_equal(apply('PosterizeIncreasing', 0), 0)  # magnitude 10: no bit kept
  np.testing.assert_array_equal(apply('SolarizeAdd', 99),
                                np.where(as_int < 128, np.minimum(as_int + 99, 255), as_int))


def test_geometric_ops_by_hand():
  image = textured_image(height=48, width=40)
  pil_image = Image.fromarray(image)
  # A quarter of the width (10 px) / height (12 px): content moves left / up, fill comes in.
  moved_left = np.asarray(augment.apply_op(pil_image, 'TranslateXRel', 0.25))
  np.testing.assert_array_equal(moved_left[:, :30], image[:, 10:])
  assert np.all(moved_left[:, 30:] == FILL)
  moved_up = np.asarray(augment.apply_op(pil_image, 'TranslateYRel', 0.25))
  np.testing.assert_array_equal(moved_up[:36], image[12:])
  assert np.all(moved_up[36:] == FILL)
  # Rotating by 27 degrees uncovers the corners, filled with the mean colour.
  rotated = np.asarray(augment.apply_op(pil_image, 'Rotate', 27.0))
  assert all(tuple(rotated[y, x]) == FILL for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)))


# --- RandAugment: magnitude and op choice --------------------------------------

def test_magnitude_is_exact_without_std_and_clipped_normal_with_it():
  rng = np.random.default_rng(0)
  assert {augment.sample_magnitude(rng, 9.0, 0.0) for _ in range(10)} == {9.0}
  samples = np.array([augment.sample_magnitude(rng, 9.0, 0.5) for _ in range(20000)])
  assert samples.min() >= 0 and samples.max() == 10.0  # Clipped at _MAX_LEVEL.
  assert np.mean(samples == 10.0) == pytest.approx(0.0228, abs=0.004)  # P(N(9, .5) > 10)
  unclipped = samples[samples < 10.0]
  assert np.median(samples) == pytest.approx(9.0, abs=0.02)
  assert unclipped.std() == pytest.approx(0.5, abs=0.05)
  at_zero = np.array([augment.sample_magnitude(rng, 0.0, 0.5) for _ in range(2000)])
  assert np.mean(at_zero == 0.0) == pytest.approx(0.5, abs=0.05)
  uniform = np.array([augment.sample_magnitude(rng, 9.0, float('inf')) for _ in range(2000)])
  assert 0 <= uniform.min() < 0.5 and 8.5 < uniform.max() <= 9.0


def _recorded_op_calls(monkeypatch, num_images, **kwargs):
  """rand_augment on `num_images` seeds with apply_op recorded: the calls, and how many per image."""
  calls = []

  def record(image, name, argument, resample):
    calls.append((name, argument, resample))
    return image

  monkeypatch.setattr(augment, 'apply_op', record)
  calls_per_image = []
  for seed in range(num_images):
    before = len(calls)
    augment.rand_augment(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(seed), **kwargs)
    calls_per_image.append(len(calls) - before)
  return calls, calls_per_image


def test_rand_augment_chooses_ops_uniformly_and_applies_each_with_probability_half(monkeypatch):
  calls, calls_per_image = _recorded_op_calls(monkeypatch, 3000, num_ops=2, magnitude=9.0,
                                              magnitude_std=0.0)
  # Two ops, each applied with p = 0.5: 0, 1 or 2 ops with p = 1/4, 1/2, 1/4.
  counts = np.bincount(calls_per_image, minlength=3) / 3000
  np.testing.assert_allclose(counts, [0.25, 0.5, 0.25], atol=0.03)
  frequency = collections.Counter(name for name, _, _ in calls)
  assert set(frequency) == set(augment.RAND_AUGMENT_OPS)
  for count in frequency.values():
    assert count / len(calls) == pytest.approx(1 / 15, abs=0.02)
  # magnitude_std 0: every op at exactly magnitude 9, so timm's level-9 arguments.
  for name, argument, resample in calls:
    rounded = None if argument is None else round(argument, 9)
    assert rounded in LEVEL_9_ARGUMENTS[name]
    assert resample == BICUBIC  # MAE's interpolation='bicubic'.


def test_rand_augment_random_interpolation_uses_bilinear_and_bicubic(monkeypatch):
  calls, _ = _recorded_op_calls(monkeypatch, 300, interpolation='random')
  geometric = {resample for name, _, resample in calls if name in augment.GEOMETRIC_OPS}
  assert geometric == {Image.Resampling.BILINEAR, BICUBIC}


def test_rand_augment_is_a_function_of_the_seed():
  image = textured_image()
  outputs = [augment.rand_augment(image, np.random.default_rng(seed)) for seed in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert outputs[0].shape == image.shape and outputs[0].dtype == np.uint8
  assert len({output.tobytes() for output in outputs}) == 4
  np.testing.assert_array_equal(
      augment.rand_augment(image, np.random.default_rng(0), num_ops=0), image)


# --- Random erasing -------------------------------------------------------------

def _area_bounds(height, width, box_height, box_width):
  """[0.02, 1/3] of the image, widened by rounding each side to whole pixels."""
  slack = (box_height + box_width) / 2 + 0.25
  return 0.02 * height * width - slack, height * width / 3 + slack


def test_erasing_changes_exactly_one_box_of_the_right_area():
  height, width = 48, 64
  image = np.zeros((height, width, 3), np.uint8)
  for seed in range(30):
    erased = augment.random_erasing(image, np.random.default_rng(seed), probability=1.0)
    top, left, box_height, box_width = augment.erasing_box(
        height, width, np.random.default_rng(seed), probability=1.0)
    changed = np.any(erased != 0, axis=-1)
    inside = np.zeros_like(changed)
    inside[top:top + box_height, left:left + box_width] = True
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.99  # Noise is 0 in all three channels only rarely.
    low, high = _area_bounds(height, width, box_height, box_width)
    assert low <= box_height * box_width <= high
    assert box_height < height and box_width < width


def test_erasing_box_distribution():
  rng = np.random.default_rng(0)
  boxes = [augment.erasing_box(100, 100, rng, probability=1.0) for _ in range(500)]
  assert all(box is not None for box in boxes)
  areas = np.array([h * w for _, _, h, w in boxes]) / 100**2
  assert 0.02 - 0.011 <= areas.min() < 0.04 and 0.3 < areas.max() <= 1 / 3 + 0.011
  aspects = np.array([h / w for _, _, h, w in boxes])
  assert aspects.min() < 0.5 and aspects.max() > 2  # Log-uniform in [0.3, 3.33].
  assert np.median(aspects) == pytest.approx(1.0, abs=0.15)
  erased = [augment.erasing_box(32, 32, rng, probability=0.25) for _ in range(2000)]
  assert np.mean([box is not None for box in erased]) == pytest.approx(0.25, abs=0.03)


def test_erasing_with_probability_zero_changes_nothing():
  image = textured_image()
  for seed in range(20):
    np.testing.assert_array_equal(
        augment.random_erasing(image, np.random.default_rng(seed), probability=0.0), image)


def test_erased_pixels_are_normal_noise_around_the_mean_colour():
  image = np.zeros((64, 64, 3), np.uint8)
  pixels = []
  for seed in range(40):
    erased = augment.random_erasing(image, np.random.default_rng(seed), probability=1.0)
    top, left, h, w = augment.erasing_box(64, 64, np.random.default_rng(seed), probability=1.0)
    pixels.append(erased[top:top + h, left:left + w].reshape(-1, 3))
  pixels = np.concatenate(pixels).astype(np.float64)
  np.testing.assert_allclose(pixels.mean(axis=0), np.array([0.485, 0.456, 0.406]) * 255, atol=2.0)
  # Normalized back with the ImageNet std, they are close to N(0, 1) (clipping trims a little).
  normalized = (pixels / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(normalized.std(axis=0), 1.0, atol=0.06)


# --- Large scale jitter ---------------------------------------------------------

def test_scale_jitter_shape_and_dtype():
  for shape in ((48, 48, 3), (40, 70, 3), (90, 30, 3)):
    image = textured_image(*shape[:2])
    for seed in range(5):
      out = augment.large_scale_jitter(image, np.random.default_rng(seed), 32)
      assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_scale_jitter_below_one_pads_with_the_mean_colour():
  image = textured_image(48, 24)  # Longer side 48 -> 16 at s = 0.5: a 16 x 8 image.
  out = augment.large_scale_jitter(image, np.random.default_rng(0), 32, scale_range=(0.5, 0.5))
  resized = np.asarray(Image.fromarray(image).resize((8, 16), BICUBIC))
  np.testing.assert_array_equal(out[:16, :8], resized)
  assert np.all(out[16:] == FILL) and np.all(out[:, 8:] == FILL)


def test_scale_jitter_above_one_crops_at_random():
  image = textured_image(48, 48)
  resized = np.asarray(Image.fromarray(image).resize((64, 64), BICUBIC))  # s = 2: 64 px.
  windows = {(top, left): resized[top:top + 32, left:left + 32].tobytes()
             for top in range(33) for left in range(33)}
  offsets = set()
  for seed in range(10):
    out = augment.large_scale_jitter(image, np.random.default_rng(seed), 32, scale_range=(2, 2))
    matches = [offset for offset, window in windows.items() if window == out.tobytes()]
    assert matches, 'not a window of the resized image'
    offsets.update(matches)
  assert len(offsets) > 5


# --- In the pipeline ------------------------------------------------------------

def _pipeline(augment_spec, seed=0):
  config = small_data_config(num_examples=64, prefetch_buffer_size=8, augment=augment_spec)
  return train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(),
                                   seed=seed)


def test_pipeline_with_randaugment_and_erasing_is_deterministic():
  spec = 'crop+flip+randaugment+erasing'
  first, second = _pipeline(spec), _pipeline(spec)
  batches = [first.next_local_numpy()['image'] for _ in range(2)]
  for batch in batches:
    assert batch.shape == (8, 32, 32, 3) and batch.dtype == np.uint8
  for batch in batches:
    np.testing.assert_array_equal(batch, second.next_local_numpy()['image'])
  plain = _pipeline('crop+flip').next_local_numpy()['image']
  assert not np.array_equal(batches[0], plain)


def test_pipeline_rejects_unknown_augment_name_when_built():
  with pytest.raises(ValueError, match="config.data.augment='crop\\+mixup'"):
    _pipeline('crop+mixup')
