"""What a batch holds: its features' names, global shapes and dtypes; random batches like it.

Every batch holds 'image' (uint8 (B, S, S, 3)) and 'label' (int32 (B,)); a label
vocabulary adds 'label_ids' (WSP), a tokenizer 'text_tokens' (FLIP), and a second
source mixed into training batches the features it declares (a self-training
student's: sources/pseudo_labelled.py). Strings (captions, hashtags) stay on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from big_pretrain.data import sources
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.data.text import tokenizer_files

# Fields that go to the device. Strings (caption, hashtags) stay on the host.
DEVICE_FEATURES = ('image', 'label')
# Added to DEVICE_FEATURES when config.labels.vocabulary is set: the WSP labels.
LABEL_IDS_FEATURE = 'label_ids'
# Added to DEVICE_FEATURES when config.text.tokenizer is set: the tokenised caption.
TEXT_TOKENS_FEATURE = 'text_tokens'


def device_feature_names(data_config: ml_collections.ConfigDict,
                         train: bool = True) -> tuple[str, ...]:
  """DEVICE_FEATURES, plus 'label_ids' if WSP labels are on, 'text_tokens' if text is,
  and in training the features of a second source mixed in (sources.second_source)."""
  names = DEVICE_FEATURES
  if labels_lib.configured_vocabulary_path(data_config):
    names += (LABEL_IDS_FEATURE,)
  if tokenizer_files.configured_tokenizer_path(data_config):
    names += (TEXT_TOKENS_FEATURE,)
  if train and (second_source := sources.second_source(data_config)) is not None:
    names += tuple(second_source.feature_shapes)
  return names


def load_text_features(
    data_config: ml_collections.ConfigDict,
) -> tuple[labels_lib.LabelVocabulary | None, tokenizer_lib.Tokenizer | None]:
  """The WSP label vocabulary and the caption tokenizer of config.data, each None when it
  is not set. An input loads them once, so every example is encoded with the same ones."""
  vocabulary = tokenizer = None
  if vocabulary_path := labels_lib.configured_vocabulary_path(data_config):
    vocabulary = labels_lib.LabelVocabulary.from_file(vocabulary_path)
  if tokenizer_path := tokenizer_files.configured_tokenizer_path(data_config):
    tokenizer = tokenizer_files.load_tokenizer(tokenizer_path)
  return vocabulary, tokenizer


def global_batch_shapes(data_config: ml_collections.ConfigDict,
                        global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global shapes and dtypes of InputPipeline's training batches, without building one.

  What the train step can be compiled for before any data is read (remat 'auto').
  """
  size, batch = data_config.image_size, global_batch_size
  shapes = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
            'label': jax.ShapeDtypeStruct((batch,), np.int32)}
  if labels_lib.configured_vocabulary_path(data_config):
    shapes[LABEL_IDS_FEATURE] = jax.ShapeDtypeStruct(
        (batch, data_config.labels.max_labels_per_example), np.int32)
  if tokenizer_files.configured_tokenizer_path(data_config):
    shapes[TEXT_TOKENS_FEATURE] = jax.ShapeDtypeStruct(
        (batch, data_config.text.max_length), np.int32)
  if (second_source := sources.second_source(data_config)) is not None:
    for name, (shape, dtype) in second_source.feature_shapes.items():
      shapes[name] = jax.ShapeDtypeStruct((batch, *shape), dtype)
  return shapes


def random_batch(data_config: ml_collections.ConfigDict, global_batch_size: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of random content with exactly the features, shapes and dtypes of
  global_batch_shapes: WSP label ids sorted and padded with -1, captions
  <bos> words <eos> with trailing padding. For benchmarks and tests."""
  shapes = global_batch_shapes(data_config, global_batch_size)
  vocabulary, tokenizer = load_text_features(data_config)
  batch = {'image': rng.integers(0, 256, shapes['image'].shape, np.uint8),
           'label': rng.integers(0, 10, shapes['label'].shape, np.int32)}
  if LABEL_IDS_FEATURE in shapes:
    num_labels = len(vocabulary)
    label_ids = np.full(shapes[LABEL_IDS_FEATURE].shape, -1, np.int32)
    for row in label_ids:
      count = min(len(row), 4, num_labels)
      row[:count] = np.sort(rng.choice(num_labels, count, replace=False))
    batch[LABEL_IDS_FEATURE] = label_ids
  if TEXT_TOKENS_FEATURE in shapes:
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    words = np.array([i for i in range(tokenizer.vocab_size) if i not in special], np.int32)
    rows = np.full(shapes[TEXT_TOKENS_FEATURE].shape, tokenizer.pad_id, np.int32)
    for row in rows:
      ids = [tokenizer.bos_id, *rng.choice(words, rng.integers(1, len(row) - 1)),
             tokenizer.eos_id]
      ids = [i for i in ids if i is not None][:len(row)]
      row[:len(ids)] = ids
    batch[TEXT_TOKENS_FEATURE] = rows
  return batch


def select_device_features(
    example: dict[str, Any], feature_names: tuple[str, ...] = DEVICE_FEATURES
) -> dict[str, np.ndarray]:
  """Keeps the numeric fields that are batched and sent to the device (see device_feature_names)."""
  features = {name: example[name] for name in feature_names}
  features['label'] = np.int32(features['label'])  # Sources give a Python int.
  return features

