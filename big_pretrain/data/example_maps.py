"""Per-example maps of the input: decode, augment or centre-crop, WSP label ids, text tokens.

Each takes a source's example (data/sources/__init__.py) and returns it with
fields added, or a transforms.SkippedExample when its image cannot be decoded,
which the input then skips and counts (corrupt_images.py). Randomness comes
only from the ``rng`` Grain passes in: a function of the seeds and the
example's index.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections
import numpy as np

from big_pretrain.data import augment as augment_lib
from big_pretrain.data import transforms
from big_pretrain.data.batch_features import LABEL_IDS_FEATURE, TEXT_TOKENS_FEATURE
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib


def _skipped_record(example: dict[str, Any]) -> transforms.SkippedExample:
  return transforms.SkippedExample(path=example.get('key') or '<unnamed record>',
                                   reason=example[transforms.DAMAGED_RECORD], damaged_record=True)


def _with_decoded_image(example: dict[str, Any]) -> dict[str, Any] | transforms.SkippedExample:
  """Adds the decoded 'image', or marks the example skipped.

  Sources give the pixels ('image'), a file to read ('image_path'), or the
  encoded bytes of a record ('image_bytes', named in warnings by its 'key').
  """
  if 'image' in example:
    return example
  if transforms.DAMAGED_RECORD in example:
    return _skipped_record(example)
  try:
    if 'image_bytes' in example:
      example = dict(example)
      encoded = example.pop('image_bytes')  # Not kept: the prefetch buffer holds pixels only.
      image = transforms.decode_image_bytes(encoded, name=example.get('key') or '<unnamed record>')
    else:
      image = transforms.decode_image(example['image_path'])
  except transforms.CorruptImageError as error:
    return transforms.SkippedExample(path=error.path, reason=error.reason)
  return {**example, 'image': image}


def _with_decoded_crop(example: dict[str, Any], rng: np.random.Generator, *, image_size: int,
                       crop_scale: tuple[float, float]
                       ) -> dict[str, Any] | transforms.SkippedExample:
  """Adds the random resized crop of the example's encoded image ('image_bytes' or
  'image_path') as 'image', decoded at the scale the crop needs; or marks it skipped."""
  if transforms.DAMAGED_RECORD in example:
    return _skipped_record(example)
  example = dict(example)
  encoded = example.pop('image_bytes', None)  # Not kept, as in _with_decoded_image.
  if encoded is None:
    source = name = example['image_path']
  else:
    source, name = encoded, example.get('key') or '<unnamed record>'
  try:
    image = transforms.decode_random_resized_crop(source, name, rng, image_size,
                                                  scale=crop_scale)
  except transforms.CorruptImageError as error:
    return transforms.SkippedExample(path=error.path, reason=error.reason)
  return {**example, 'image': image}


def augment_for_training(
    example: dict[str, Any],
    rng: np.random.Generator,
    *,
    augment: tuple[str, ...],
    decode_at_crop_scale: bool = False,
    **settings,
) -> dict[str, Any] | transforms.SkippedExample:
  """Decode, then the transforms ``augment`` (augment.parse_augment of config.data.augment).

  ``settings`` are augment.augment_image's: image_size, crop_scale, randaugment_ops,
  randaugment_magnitude, randaugment_magnitude_std, erasing_prob and scale_jitter.
  With ``decode_at_crop_scale`` and 'crop' first, the decode and the crop are one step
  (_with_decoded_crop), with the same draws of ``rng``.
  """
  crop_while_decoding = (decode_at_crop_scale and augment[:1] == ('crop',)
                         and 'image' not in example)
  if crop_while_decoding:
    example = _with_decoded_crop(example, rng, image_size=settings['image_size'],
                                 crop_scale=settings['crop_scale'])
    augment = augment[1:]
  else:
    example = _with_decoded_image(example)
  if isinstance(example, transforms.SkippedExample):
    return example
  image = augment_lib.augment_image(example['image'], rng, augment,
                                    resized=crop_while_decoding, **settings)
  return {**example, 'image': image}


def prepare_for_eval(
    example: dict[str, Any], *, image_size: int, crop_fraction: float = 1.0
) -> dict[str, Any] | transforms.SkippedExample:
  """Decode and centre crop."""
  example = _with_decoded_image(example)
  if isinstance(example, transforms.SkippedExample):
    return example
  return {**example, 'image': transforms.center_crop_resize(example['image'], image_size,
                                                             crop_fraction)}


def add_label_ids(
    example: dict[str, Any],
    *,
    vocabulary: labels_lib.LabelVocabulary,
    max_labels_per_example: int,
    use_caption_words: bool,
) -> dict[str, Any]:
  """Adds 'label_ids': int32 (max_labels_per_example,), the sorted WSP label ids padded with -1.

  An example with no known label keeps an all -1 row: the WSP objective leaves
  it out of the loss and counts it, rather than the pipeline silently dropping it.
  """
  label_ids = vocabulary.encode(example.get('hashtags') or (), example.get('caption') or '',
                                use_caption_words=use_caption_words)
  return {**example,
          LABEL_IDS_FEATURE: labels_lib.pad_label_ids(label_ids, max_labels_per_example)}


def add_text_tokens(
    example: dict[str, Any], *, tokenizer: tokenizer_lib.Tokenizer, max_length: int
) -> dict[str, Any]:
  """Adds 'text_tokens': int32 (max_length,), the caption tokenised, padded or truncated.

  An example without a caption gets <bos> <eos> and padding, rather than being
  dropped: the objective sees it, and so do its metrics.
  """
  return {**example,
          TEXT_TOKENS_FEATURE: tokenizer.tokenize(example.get('caption') or '', max_length)}


def with_label_ids_and_text_tokens(
    dataset: grain.MapDataset, data_config: ml_collections.ConfigDict,
    vocabulary: labels_lib.LabelVocabulary | None,
    tokenizer: tokenizer_lib.Tokenizer | None) -> grain.MapDataset:
  """`dataset` with 'label_ids' added when there is a vocabulary (WSP) and 'text_tokens'
  when there is a tokenizer (FLIP); unchanged otherwise."""
  if vocabulary is not None:
    dataset = dataset.map(functools.partial(
        add_label_ids, vocabulary=vocabulary,
        max_labels_per_example=data_config.labels.max_labels_per_example,
        use_caption_words=data_config.labels.use_caption_words))
  if tokenizer is not None:
    dataset = dataset.map(functools.partial(
        add_text_tokens, tokenizer=tokenizer, max_length=data_config.text.max_length))
  return dataset

