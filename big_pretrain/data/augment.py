"""Named, composable training augmentations: config.data.augment = 'crop+flip+randaugment+erasing'.

Each name is one transform of a uint8 (H, W, 3) image, applied left to right
(`augment_image`):

  crop          transforms.random_resized_crop to image_size, area in config.data.crop_scale.
  flip          transforms.random_horizontal_flip, p = 0.5.
  randaugment   `rand_augment`: timm's RandAugment 'rand-m9-mstd0.5-inc1' (MAE fine-tuning).
  erasing       `random_erasing`: timm's RandomErasing(mode='pixel', max_count=1) (MAE fine-tuning).
  scale_jitter  `large_scale_jitter`: resize the longer side to image_size * U(scale_jitter),
                pad with the mean colour, random image_size crop (Copy-Paste's LSJ).

`crop` and `scale_jitter` each output (image_size, image_size); a list with
neither centre-crops the image to image_size first (as eval does), so every
output is (image_size, image_size, 3) uint8. `scale_jitter` must come before
`crop`: `crop` then cuts a random resized crop out of the jittered square.
Every random choice comes from the ``np.random.Generator`` passed in, so in the
Grain pipeline an example's augmentation is a function of its seed and index.

The reference for RandAugment and random erasing is timm (pytorch-image-models,
Apache-2.0): timm/data/auto_augment.py (rand_augment_transform, AugmentOp, the
*_level_to_arg functions), timm/data/random_erasing.py (RandomErasing) and
timm/data/transforms_factory.py (transforms_imagenet_train, which sets the
hparams), as MAE's main_finetune.py uses them through
``create_transform(auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
re_prob=0.25, re_mode='pixel', re_count=1)``. The RandAugment ops are the same
PIL calls with the same arguments, so at a given op, level and sign they give
the same pixels; the random streams differ (numpy here, Python's `random` in timm).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from big_pretrain import schema
from big_pretrain.data import transforms
from big_pretrain.errors import ConfigError
from big_pretrain.models import patches

AUGMENT_NAMES = ('crop', 'flip', 'randaugment', 'erasing', 'scale_jitter')
# The augmentation policies of "Rethinking Pre-training and Self-training" (Zoph et al.
# 2020), by name: config.data.augment='S4'. S2 and S3 use AutoAugment in the paper;
# RandAugment stands in for it here, so S3 is S4.
POLICIES = {
    'S1': 'crop+flip',
    'S2': 'crop+flip+randaugment',
    'S3': 'scale_jitter+crop+flip+randaugment',
    'S4': 'scale_jitter+crop+flip+randaugment',
}
# Transforms that resize to image_size themselves; without one, a centre crop does.
_RESIZING_NAMES = ('crop', 'scale_jitter')

# The fill colour of RandAugment's geometric ops and of large scale jitter's
# padding: the ImageNet mean in pixels, (124, 116, 104), as timm's img_mean hparam.
MEAN_PIXEL = tuple(min(255, round(255 * m)) for m in patches.IMAGENET_MEAN)
# RandAugment magnitudes are on timm's 0..10 scale; level / MAX_LEVEL is an op's strength.
MAX_LEVEL = 10.0


# --- The augment spec -----------------------------------------------------------

# The keys of config.data that shape training images (evaluation: a centre crop only).
DATA_KEYS = schema.Group(
    'training augmentation',
    crop_scale=schema.Key((0.2, 1.0), schema.ordered_pair(0, 1),
                          "RandomResizedCrop's range of the crop's share of the image area"),
    augment=schema.Key(
        'crop+flip', schema.REQUIRED_TEXT,
        "training transforms joined by '+', applied left to right: crop, flip, randaugment, "
        'erasing, scale_jitter; or a policy S1...S4 (MAE fine-tuning: '
        "'crop+flip+randaugment+erasing'); without crop or scale_jitter, images are "
        'centre-cropped to image_size first'),
    decode_at_crop_scale=schema.Key(
        True, schema.BOOLEAN,
        "with 'crop' first: a JPEG whose crop window is 2, 4 or 8 times image_size is decoded "
        "at 1/2, 1/4 or 1/8 of its size (PIL's draft mode: the same crop of a slightly "
        'differently low-passed image, 2.4x less work per 1600x1200 photo)'),
    randaugment_ops=schema.Key(2, schema.NON_NEGATIVE_COUNT,
                               "RandAugment's ops per image, each applied with p=0.5 (timm's "
                               "'rand-m9-mstd0.5-inc1')"),
    randaugment_magnitude=schema.Key(9.0, schema.within(0, MAX_LEVEL),
                                     "RandAugment's magnitude (9 in MAE fine-tuning)"),
    randaugment_magnitude_std=schema.Key(
        0.5, schema.at_least(0),
        'the magnitude is drawn from N(magnitude, std) clipped to [0, 10]; 0: fixed; inf: '
        'uniform in [0, magnitude]'),
    erasing_prob=schema.Key(0.25, schema.within(0, 1),
                            'random erasing: the chance of erasing one box (MAE fine-tuning)'),
    scale_jitter=schema.Key((0.5, 2.0), schema.ordered_pair(0, None),
                            'large scale jitter: the longer side is resized to image_size * '
                            'U(min, max)'),
)


def check_config(data, path: str) -> None:
  """Raises ConfigError when config.data.augment does not parse (see parse_augment)."""
  try:
    parse_augment(data.augment)
  except ValueError as error:
    raise ConfigError(str(error).replace('config.data.', f'{path}.data.')) from None


def parse_augment(spec: str) -> tuple[str, ...]:
  """'crop+flip' -> ('crop', 'flip'); raises ValueError naming config.data.augment.

  '' means no augmentation (centre crop only); a policy name ('S1' ... 'S4', see
  POLICIES) stands for its transforms. Each name may appear once, and
  'scale_jitter' must come before 'crop': cropping first and then rescaling
  the small crop would throw away the source image's resolution.
  """
  if not isinstance(spec, str):
    raise ValueError(f'config.data.augment={spec!r} must be a string of names joined by'
                     f' "+", e.g. "crop+flip"; valid names: {", ".join(AUGMENT_NAMES)}.')
  spec = POLICIES.get(spec.strip(), spec)
  names = tuple(name.strip() for name in spec.split('+')) if spec.strip() else ()
  for name in names:
    if name not in AUGMENT_NAMES:
      raise ValueError(f'config.data.augment={spec!r}: unknown transform {name!r}; valid'
                       f' names: {", ".join(AUGMENT_NAMES)} (joined by "+", applied left to right).')
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f'config.data.augment={spec!r} names {", ".join(repeated)} more than once.')
  if 'crop' in names and 'scale_jitter' in names and (
      names.index('scale_jitter') > names.index('crop')):
    raise ValueError(f'config.data.augment={spec!r}: scale_jitter must come before crop'
                     ' (crop then cuts its random resized crop out of the jittered image).')
  return names


def augment_image(
    image: np.ndarray,
    rng: np.random.Generator,
    names: tuple[str, ...],
    *,
    image_size: int,
    crop_scale: tuple[float, float],
    randaugment_ops: int,
    randaugment_magnitude: float,
    randaugment_magnitude_std: float,
    erasing_prob: float,
    scale_jitter: tuple[float, float],
    resized: bool = False,
) -> np.ndarray:
  """Applies the transforms ``names`` (see parse_augment) left to right -> uint8 (S, S, 3).

  ``resized``: the image is already (S, S), cropped while it was decoded (the pipeline's
  decode_at_crop_scale); otherwise, without crop or scale_jitter, it is centre-cropped first.
  """
  if not resized and not any(name in _RESIZING_NAMES for name in names):
    image = transforms.center_crop_resize(image, image_size)
  for name in names:
    if name == 'crop':
      image = transforms.random_resized_crop(image, rng, image_size, scale=crop_scale)
    elif name == 'flip':
      image = transforms.random_horizontal_flip(image, rng)
    elif name == 'randaugment':
      image = rand_augment(image, rng, num_ops=randaugment_ops, magnitude=randaugment_magnitude,
                           magnitude_std=randaugment_magnitude_std)
    elif name == 'erasing':
      image = random_erasing(image, rng, probability=erasing_prob)
    elif name == 'scale_jitter':
      image = large_scale_jitter(image, rng, image_size, scale_range=scale_jitter)
    else:
      raise ValueError(f'Unknown augmentation {name!r}; valid names: {", ".join(AUGMENT_NAMES)}.')
  return image


# --- RandAugment ----------------------------------------------------------------

# timm's _RAND_INCREASING_TRANSFORMS ('inc1'): every op grows stronger with the magnitude.
RAND_AUGMENT_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
# Ops that resample the image and fill the uncovered area with MEAN_PIXEL.
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')

OP_PROBABILITY = 0.5  # Each chosen op is applied with this probability (timm's AugmentOp prob).
# timm's 'mstd' above 100 means uniform sampling in [0, magnitude], as magnitude_std=inf.
_UNIFORM_MAGNITUDE_STD = 100.0

# Geometric ops resample bicubic: MAE passes interpolation='bicubic' to create_transform,
# which sets timm's 'interpolation' hparam. 'random' picks bilinear or bicubic per op,
# timm's default when no interpolation is given.
_RESAMPLE = {'bicubic': (Image.Resampling.BICUBIC,), 'bilinear': (Image.Resampling.BILINEAR,),
             'random': (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)}


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    magnitude_max: float = MAX_LEVEL,
    interpolation: str = 'bicubic',
) -> np.ndarray:
  """timm's RandAugment with the increasing ops, uint8 (H, W, 3) -> same shape.

  Chooses ``num_ops`` of RAND_AUGMENT_OPS uniformly with replacement; each is
  applied with probability 0.5, at a magnitude drawn per op (sample_magnitude).
  """
  if interpolation not in _RESAMPLE:
    raise ValueError(f'RandAugment interpolation={interpolation!r}: use one of {", ".join(_RESAMPLE)}.')
  pil_image = Image.fromarray(image)
  for op_index in rng.integers(0, len(RAND_AUGMENT_OPS), size=num_ops):
    name = RAND_AUGMENT_OPS[op_index]
    if rng.random() > OP_PROBABILITY:  # As timm: skipped when the draw is above prob.
      continue
    level = sample_magnitude(rng, magnitude, magnitude_std, magnitude_max)
    argument = op_argument(name, level, rng)
    pil_image = apply_op(pil_image, name, argument, _resample(name, interpolation, rng))
  return np.asarray(pil_image, dtype=np.uint8)


def _resample(name: str, interpolation: str, rng: np.random.Generator):
  """The PIL filter of a geometric op: per _RESAMPLE, drawn only for 'random' and geometric ops."""
  choices = _RESAMPLE[interpolation]
  if name in GEOMETRIC_OPS and len(choices) > 1:
    return choices[rng.integers(len(choices))]
  return choices[0]


def sample_magnitude(rng: np.random.Generator, magnitude: float, magnitude_std: float,
                     magnitude_max: float = MAX_LEVEL) -> float:
  """timm's per-op magnitude: N(magnitude, magnitude_std), clipped to [0, magnitude_max].

  magnitude_std = 0 keeps the magnitude fixed; inf (or above 100, as timm's
  'mstd' parser) draws it uniformly in [0, magnitude] instead.
  """
  if magnitude_std > _UNIFORM_MAGNITUDE_STD:  # Also inf.
    level = rng.uniform(0.0, magnitude)
  elif magnitude_std > 0:
    level = rng.normal(magnitude, magnitude_std)
  else:
    level = magnitude
  return float(max(0.0, min(level, magnitude_max)))


def _random_sign(value: float, rng: np.random.Generator) -> float:
  """value or -value with probability 1/2 each (timm's _randomly_negate)."""
  return -value if rng.random() < 0.5 else value


def _enhance_factor(level: float, rng: np.random.Generator) -> float:
  # 1.0 leaves the image unchanged; the factor moves 0.9 * level / 10 away from it, either way.
  return max(0.1, 1.0 + _random_sign(level / MAX_LEVEL * 0.9, rng))


# timm's *_level_to_arg functions for the increasing ops; (level, rng) -> the op's argument.
# The arithmetic is in timm's order so that float rounding and int() give the same values.
_LEVEL_TO_ARGUMENT: dict[str, Callable[[float, np.random.Generator], float | int | None]] = {
    'AutoContrast': lambda level, rng: None,
    'Equalize': lambda level, rng: None,
    'Invert': lambda level, rng: None,
    'Rotate': lambda level, rng: _random_sign((level / MAX_LEVEL) * 30.0, rng),  # Degrees.
    # Bits kept: 4 at level 0 down to 0 at level 10.
    'PosterizeIncreasing': lambda level, rng: 4 - int((level / MAX_LEVEL) * 4),
    # Threshold: 256 (nothing inverted) at level 0 down to 0 (everything) at level 10.
    'SolarizeIncreasing': lambda level, rng: 256 - int((level / MAX_LEVEL) * 256),
    'SolarizeAdd': lambda level, rng: int((level / MAX_LEVEL) * 110),  # Added below 128.
    'ColorIncreasing': _enhance_factor,
    'ContrastIncreasing': _enhance_factor,
    'BrightnessIncreasing': _enhance_factor,
    'SharpnessIncreasing': _enhance_factor,
    'ShearX': lambda level, rng: _random_sign((level / MAX_LEVEL) * 0.3, rng),
    'ShearY': lambda level, rng: _random_sign((level / MAX_LEVEL) * 0.3, rng),
    # Fraction of the image width (height) to shift by; timm's default translate_pct 0.45.
    'TranslateXRel': lambda level, rng: _random_sign((level / MAX_LEVEL) * 0.45, rng),
    'TranslateYRel': lambda level, rng: _random_sign((level / MAX_LEVEL) * 0.45, rng),
}


def op_argument(name: str, level: float, rng: np.random.Generator) -> float | int | None:
  """The argument timm's level function gives op ``name`` at ``level`` (signed ops draw a sign)."""
  return _LEVEL_TO_ARGUMENT[name](level, rng)


def _affine(image: Image.Image, matrix: tuple[float, ...], resample) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample,
                         fillcolor=MEAN_PIXEL)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, value + add) if value < threshold else value for value in range(256)]
  return image.point(lut * len(image.getbands()))


def apply_op(image: Image.Image, name: str, argument, resample=Image.Resampling.BICUBIC
             ) -> Image.Image:
  """Applies RandAugment op ``name`` with ``argument`` (from op_argument): the PIL call timm makes."""
  if name == 'AutoContrast':
    return ImageOps.autocontrast(image)
  if name == 'Equalize':
    return ImageOps.equalize(image)
  if name == 'Invert':
    return ImageOps.invert(image)
  if name == 'Rotate':
    return image.rotate(argument, resample=resample, fillcolor=MEAN_PIXEL)
  if name == 'PosterizeIncreasing':
    if argument <= 0:  # Keeps no bit: black. (PIL >= 11 refuses posterize(image, 0).)
      return Image.new(image.mode, image.size)
    return image if argument >= 8 else ImageOps.posterize(image, argument)
  if name == 'SolarizeIncreasing':
    return ImageOps.solarize(image, argument)
  if name == 'SolarizeAdd':
    return _solarize_add(image, argument)
  if name == 'ColorIncreasing':
    return ImageEnhance.Color(image).enhance(argument)
  if name == 'ContrastIncreasing':
    return ImageEnhance.Contrast(image).enhance(argument)
  if name == 'BrightnessIncreasing':
    return ImageEnhance.Brightness(image).enhance(argument)
  if name == 'SharpnessIncreasing':
    return ImageEnhance.Sharpness(image).enhance(argument)
  # The affine matrix maps output pixels to the input pixels they sample.
  if name == 'ShearX':
    return _affine(image, (1, argument, 0, 0, 1, 0), resample)
  if name == 'ShearY':
    return _affine(image, (1, 0, 0, argument, 1, 0), resample)
  if name == 'TranslateXRel':
    return _affine(image, (1, 0, argument * image.size[0], 0, 1, 0), resample)
  if name == 'TranslateYRel':
    return _affine(image, (1, 0, 0, 0, 1, argument * image.size[1]), resample)
  raise ValueError(f'Unknown RandAugment op {name!r}; valid ops: {", ".join(RAND_AUGMENT_OPS)}.')


# --- Random erasing -------------------------------------------------------------

def erasing_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    probability: float,
    area_range: tuple[float, float] = (0.02, 1 / 3),
    min_aspect: float = 0.3,
) -> tuple[int, int, int, int] | None:
  """timm's RandomErasing box (top, left, box_height, box_width), or None: nothing to erase.

  With ``probability``, up to 10 attempts draw an area fraction uniformly in
  ``area_range`` and an aspect ratio (height / width) log-uniformly in
  [min_aspect, 1 / min_aspect]; the first box strictly smaller than the image wins.
  """
  if not rng.random() < probability:
    return None
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(*area_range) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    box_height = int(round(math.sqrt(target_area * aspect)))
    box_width = int(round(math.sqrt(target_area / aspect)))
    if box_width < width and box_height < height:
      top = int(rng.integers(0, height - box_height + 1))
      left = int(rng.integers(0, width - box_width + 1))
      return top, left, box_height, box_width
  return None


def normal_noise_pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """uint8 pixels whose normalized values are N(0, 1): (z * std + mean) * 255, rounded, clipped."""
  z = rng.standard_normal(shape)
  pixels = (z * np.asarray(patches.IMAGENET_STD) + np.asarray(patches.IMAGENET_MEAN)) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def random_erasing(image: np.ndarray, rng: np.random.Generator, *, probability: float = 0.25
                   ) -> np.ndarray:
  """timm's RandomErasing(probability, mode='pixel', max_count=1) on a uint8 (H, W, 3) image.

  (choice) timm erases the normalized tensor with per-pixel N(0, 1) values; the
  image is still uint8 here (the model normalizes on the device), so the box
  gets N(0, 1) noise in normalized space mapped back to pixels. What differs is
  the rounding to uint8 and the clipping to [0, 255] of the few percent of
  draws beyond about two standard deviations.
  """
  box = erasing_box(image.shape[0], image.shape[1], rng, probability=probability)
  if box is None:
    return image
  top, left, box_height, box_width = box
  erased = image.copy()
  erased[top:top + box_height, left:left + box_width] = normal_noise_pixels(
      rng, (box_height, box_width, image.shape[2]))
  return erased


# --- Large scale jitter -----------------------------------------------------------

def large_scale_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
  """Copy-Paste's large scale jitter, uint8 (H, W, 3) -> (size, size, 3).

  Resizes (bicubic, aspect ratio kept) so the longer side is size * s, s ~
  U(scale_range); pads the bottom and right with MEAN_PIXEL up to at least
  (size, size), as Detectron2's ResizeScale + FixedSizeCrop; then takes a random
  (size, size) crop. s < 1 shrinks the image into a padded square, s > 1 crops.
  """
  height, width = image.shape[:2]
  scale = rng.uniform(*scale_range) * size / max(height, width)
  new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
  resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
  canvas = np.empty((max(size, new_height), max(size, new_width), 3), np.uint8)
  canvas[...] = MEAN_PIXEL
  canvas[:new_height, :new_width] = np.asarray(resized, dtype=np.uint8)
  top = int(rng.integers(0, canvas.shape[0] - size + 1))
  left = int(rng.integers(0, canvas.shape[1] - size + 1))
  return np.ascontiguousarray(canvas[top:top + size, left:left + size])
