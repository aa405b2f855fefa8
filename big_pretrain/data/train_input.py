"""The Grain input pipeline: source -> shuffle -> shard -> augment -> batch -> global arrays.

Per process::

  MapDataset.source(source)
    .shuffle(seed)                        # train only; reshuffled every epoch
    .repeat(None)                         # train only; eval reads one epoch of whole batches
    .map(add_label_ids)                   # only when config.labels.vocabulary is set (WSP)
    .map(add_text_tokens)                 # only when config.text.tokenizer is set (FLIP)
    .random_map(decode, config.augment)   # e.g. crop+flip (data/augment.py); eval: centre crop
    -> ProcessShare                       # this process's rows of every global batch
    .to_iter_dataset(ReadOptions(...))    # decoding runs in num_threads threads
    -> skip and count corrupt images      # stop after max_consecutive_unreadable in a row
    .map(select_device_features)
    .batch(per_process_batch, drop_remainder=True)

and each per-process batch becomes a global ``jax.Array`` whose batch dimension
is sharded over the mesh axes ('data', 'fsdp').

All randomness (shuffle order, crops, flips, RandAugment, erasing) is a deterministic function of the
seeds and the element's global index, so restoring ``grain_iterator``'s state
resumes the exact same stream of batches, and a run on N processes sees the
same global batches, row for row, as a run on one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from absl import logging
import grain
import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import augment as augment_lib
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.sources import pseudo_labelled as pseudo_labels_lib
from big_pretrain.data import sources
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.data import transforms
from big_pretrain.errors import UnreadableDataError

# Fields that go to the device. Strings (caption, hashtags) stay on the host.
DEVICE_FEATURES = ('image', 'label')
# Added to DEVICE_FEATURES when config.labels.vocabulary is set: the WSP labels.
LABEL_IDS_FEATURE = 'label_ids'
# Added to DEVICE_FEATURES when config.text.tokenizer is set: the tokenised caption.
TEXT_TOKENS_FEATURE = 'text_tokens'
# Added to training batches when config.pseudo_labels is set (self-training's student):
# 1 for a pseudo-labelled row, and its teacher's classes and probabilities.
PSEUDO_FEATURES = ('is_pseudo', 'pseudo_ids', 'pseudo_probs')

# The most Grain threads config.data.num_threads=None picks (Grain's own default).
MAX_AUTO_THREADS = 16

# config.data.max_consecutive_unreadable's default: several large batches of nothing but
# unreadable images is a broken source, not bad luck.
DEFAULT_MAX_CONSECUTIVE_UNREADABLE = 1000
# Skipped images named one warning each; after that, one summary line every SKIP_SUMMARY_EVERY,
# so a partly broken dataset does not flood the log.
SKIPS_NAMED_ONE_BY_ONE = 10
SKIP_SUMMARY_EVERY = 1000

# Independent random streams derived from the seeds.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_EVAL_SHUFFLE_STREAM = 2
_PSEUDO_SHUFFLE_STREAM = 3


def device_feature_names(data_config: ml_collections.ConfigDict,
                         train: bool = True) -> tuple[str, ...]:
  """DEVICE_FEATURES, plus 'label_ids' if WSP labels are on, 'text_tokens' if text is,
  and in training PSEUDO_FEATURES if pseudo-labels are mixed in."""
  names = DEVICE_FEATURES
  if _label_vocabulary_path(data_config):
    names += (LABEL_IDS_FEATURE,)
  if tokenizer_lib.configured_tokenizer_path(data_config):
    names += (TEXT_TOKENS_FEATURE,)
  if train and pseudo_label_folder(data_config):
    names += PSEUDO_FEATURES
  return names


def pseudo_label_folder(data_config: ml_collections.ConfigDict) -> str | None:
  """The pseudo-labels mixed into training batches (config.pseudo_labels.path), or None."""
  return ((data_config.get('pseudo_labels') or {}).get('path')) or None


def pseudo_label_width(data_config: ml_collections.ConfigDict) -> int:
  """Width of the 'pseudo_ids' / 'pseudo_probs' rows: the job's top_k (1 for hard labels)."""
  labels = pseudo_labels_lib.read_metadata(pseudo_label_folder(data_config))['labels']
  return 1 if labels['kind'] == 'hard' else int(labels['top_k'])


def global_batch_shapes(data_config: ml_collections.ConfigDict,
                        global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global shapes and dtypes of InputPipeline's training batches, without building one.

  What the train step can be compiled for before any data is read (remat 'auto').
  """
  size, batch = data_config.image_size, global_batch_size
  shapes = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
            'label': jax.ShapeDtypeStruct((batch,), np.int32)}
  names = device_feature_names(data_config)
  if LABEL_IDS_FEATURE in names:
    shapes[LABEL_IDS_FEATURE] = jax.ShapeDtypeStruct(
        (batch, data_config.labels.max_labels_per_example), np.int32)
  if TEXT_TOKENS_FEATURE in names:
    shapes[TEXT_TOKENS_FEATURE] = jax.ShapeDtypeStruct(
        (batch, data_config.text.max_length), np.int32)
  if 'is_pseudo' in names:
    width = pseudo_label_width(data_config)
    shapes['is_pseudo'] = jax.ShapeDtypeStruct((batch,), np.int32)
    shapes['pseudo_ids'] = jax.ShapeDtypeStruct((batch, width), np.int32)
    shapes['pseudo_probs'] = jax.ShapeDtypeStruct((batch, width), np.float32)
  return shapes


def random_batch(data_config: ml_collections.ConfigDict, global_batch_size: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A batch of random content with exactly the features, shapes and dtypes of
  global_batch_shapes: WSP label ids sorted and padded with -1, captions
  <bos> words <eos> with trailing padding. For benchmarks and tests."""
  shapes = global_batch_shapes(data_config, global_batch_size)
  batch = {'image': rng.integers(0, 256, shapes['image'].shape, np.uint8),
           'label': rng.integers(0, 10, shapes['label'].shape, np.int32)}
  if LABEL_IDS_FEATURE in shapes:
    num_labels = len(_load_label_vocabulary(data_config))
    label_ids = np.full(shapes[LABEL_IDS_FEATURE].shape, -1, np.int32)
    for row in label_ids:
      count = min(len(row), 4, num_labels)
      row[:count] = np.sort(rng.choice(num_labels, count, replace=False))
    batch[LABEL_IDS_FEATURE] = label_ids
  if TEXT_TOKENS_FEATURE in shapes:
    tokenizer = tokenizer_lib.load_tokenizer(data_config.text.tokenizer)
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


def num_reader_threads(data_config: ml_collections.ConfigDict) -> int:
  """config.num_threads, or for None one per CPU core available, at most MAX_AUTO_THREADS."""
  if data_config.num_threads is not None:
    return data_config.num_threads
  if hasattr(os, 'sched_getaffinity'):  # Linux: the cores this process may run on
    cores = len(os.sched_getaffinity(0))
  else:
    cores = os.cpu_count() or 1
  return max(1, min(MAX_AUTO_THREADS, cores))


def _label_vocabulary_path(data_config: ml_collections.ConfigDict) -> str | None:
  # .get: configs written before WSP labels existed have no 'labels' group.
  return (data_config.get('labels') or {}).get('vocabulary')


# --- Per-example steps -------------------------------------------------------

def _with_decoded_image(example: dict[str, Any]) -> dict[str, Any] | transforms.SkippedExample:
  """Adds the decoded 'image', or marks the example skipped.

  Sources give the pixels ('image'), a file to read ('image_path'), or the
  encoded bytes of a record ('image_bytes', named in warnings by its 'key').
  """
  if 'image' in example:
    return example
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
    image_size: int,
    crop_scale: tuple[float, float],
    augment: tuple[str, ...],
    randaugment_ops: int,
    randaugment_magnitude: float,
    randaugment_magnitude_std: float,
    erasing_prob: float,
    scale_jitter: tuple[float, float],
    decode_at_crop_scale: bool = False,
) -> dict[str, Any] | transforms.SkippedExample:
  """Decode, then the transforms ``augment`` (augment.parse_augment of config.data.augment).

  With ``decode_at_crop_scale`` and 'crop' first, the decode and the crop are one step
  (_with_decoded_crop), with the same draws of ``rng``.
  """
  crop_while_decoding = (decode_at_crop_scale and augment[:1] == ('crop',)
                         and 'image' not in example)
  if crop_while_decoding:
    example = _with_decoded_crop(example, rng, image_size=image_size, crop_scale=crop_scale)
    augment = augment[1:]
  else:
    example = _with_decoded_image(example)
  if isinstance(example, transforms.SkippedExample):
    return example
  image = augment_lib.augment_image(
      example['image'], rng, augment, image_size=image_size, crop_scale=crop_scale,
      randaugment_ops=randaugment_ops, randaugment_magnitude=randaugment_magnitude,
      randaugment_magnitude_std=randaugment_magnitude_std, erasing_prob=erasing_prob,
      scale_jitter=scale_jitter, resized=crop_while_decoding)
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


def as_human_labelled_row(example: dict[str, Any], *, width: int) -> dict[str, Any]:
  """A human-labelled row of a mixed batch: no pseudo-label (is_pseudo 0, ids -1)."""
  return {**example, 'is_pseudo': np.int32(0), 'pseudo_ids': np.full(width, -1, np.int32),
          'pseudo_probs': np.zeros(width, np.float32)}


def as_pseudo_labelled_row(example: dict[str, Any]) -> dict[str, Any]:
  return {**example, 'is_pseudo': np.int32(1)}


def select_device_features(
    example: dict[str, Any], feature_names: tuple[str, ...] = DEVICE_FEATURES
) -> dict[str, np.ndarray]:
  """Keeps the numeric fields that are batched and sent to the device (see device_feature_names)."""
  features = {name: example[name] for name in feature_names}
  features['label'] = np.int32(features['label'])  # Sources give a Python int.
  return features


def _load_label_vocabulary(
    data_config: ml_collections.ConfigDict) -> labels_lib.LabelVocabulary | None:
  """The WSP label vocabulary of config.labels, or None when it is not set."""
  path = _label_vocabulary_path(data_config)
  if not path:
    return None
  max_labels = data_config.labels.max_labels_per_example
  if not isinstance(max_labels, int) or max_labels < 1:
    raise ValueError(
        f'config.data.labels.max_labels_per_example={max_labels!r} must be a positive'
        ' integer: the width of the padded label_ids rows.')
  return labels_lib.LabelVocabulary.from_file(path)


def _load_text_tokenizer(
    data_config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer | None:
  """The tokenizer of config.text, or None when it is not set."""
  path = tokenizer_lib.configured_tokenizer_path(data_config)
  if not path:
    return None
  max_length = data_config.text.max_length
  if not isinstance(max_length, int) or max_length < 2:
    raise ValueError(
        f'config.data.text.max_length={max_length!r} must be an integer of at least 2: the'
        ' width of the text_tokens rows, which hold <bos> and <eos> (32 in FLIP).')
  return tokenizer_lib.load_tokenizer(path)


# --- Skipping corrupt examples ------------------------------------------------

@dataclasses.dataclass
class SkippedExampleCounter:
  """How many examples were skipped; owned by one pipeline, saved in its iterator state."""
  count: int = 0


def describe_source(data_config: ml_collections.ConfigDict) -> str:
  """Where a pipeline reads, for messages: "config.data.path='/data/train' (image_folder)"."""
  split = data_config.get('split', 'train')
  if data_config.source == 'tfds':
    return f'TFDS {data_config.get("tfds_name")!r} ({split} split)'
  key = 'test_path' if split == 'test' else 'path'
  return f'config.data.{key}={data_config.get(key)!r} ({data_config.source})'


class _SkipCorruptExamplesDatasetIterator(grain.DatasetIterator):
  """Drops SkippedExample markers, counting each; stops a source that yields no image.

  Runs in the process's main thread, after Grain's reader threads, and sees
  examples in the pipeline's order: "in a row" means consecutive in this
  process's share of the stream. The run of unreadable images is not part of
  the saved state (a resumed run starts a new one), so at most about twice
  the limit are read before the error.
  """

  def __init__(self, parent: grain.DatasetIterator, counter: SkippedExampleCounter,
               max_consecutive: int, source_description: str):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive
    self._source_description = source_description
    self._skipped_in_a_row: list[transforms.SkippedExample] = []
    self._skipped_by_this_iterator = 0  # what the log has named so far counts from here

  def __next__(self):
    while True:
      element = next(self._parent)
      if not isinstance(element, transforms.SkippedExample):
        self._skipped_in_a_row.clear()
        return element
      self._counter.count += 1
      self._skipped_by_this_iterator += 1
      self._log_skip(element)
      self._skipped_in_a_row.append(element)
      if len(self._skipped_in_a_row) >= self._max_consecutive:
        raise UnreadableDataError(self._no_readable_image_message())

  def _log_skip(self, element: transforms.SkippedExample) -> None:
    skipped = self._skipped_by_this_iterator
    if skipped <= SKIPS_NAMED_ONE_BY_ONE:
      last_named = (f' Further skips are summarised every {SKIP_SUMMARY_EVERY}.'
                    if skipped == SKIPS_NAMED_ONE_BY_ONE else '')
      logging.warning('Skipping unreadable image %s (%s). %d skipped so far.%s',
                      element.path, element.reason, self._counter.count, last_named)
    elif skipped % SKIP_SUMMARY_EVERY == 0:
      logging.warning('%d unreadable images skipped so far; the latest: %s (%s).',
                      self._counter.count, element.path, element.reason)

  def _no_readable_image_message(self) -> str:
    # Distinct files: a small folder repeats within the run.
    paths = list(dict.fromkeys(skipped.path for skipped in self._skipped_in_a_row))
    return (
        f'No readable image in the last {len(self._skipped_in_a_row)} read from '
        f'{self._source_description}; {self._counter.count} unreadable in all, e.g. '
        f'{", ".join(paths[:3])} (the last: {self._skipped_in_a_row[-1].reason}). Check that '
        'the source holds images (JPEG, PNG, ...) that are not damaged, or raise '
        f'config.data.max_consecutive_unreadable (now {self._max_consecutive}) to read past '
        'a longer stretch of broken ones.')

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(),
            'corrupt_images_skipped': self._counter.count}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._counter.count = int(state['corrupt_images_skipped'])
    self._skipped_in_a_row.clear()

  def __str__(self) -> str:
    return 'SkipCorruptExamplesDatasetIterator'


class SkipCorruptExamplesIterDataset(grain.IterDataset):
  """Drops examples the pipeline marked as SkippedExample; counts them in ``counter``.

  The count is part of the iterator state, so a restored run reports the same
  count as the run that saved it. ``max_consecutive`` unreadable examples in a
  row raise UnreadableDataError naming some of them and ``source_description``.
  """

  def __init__(self, parent: grain.IterDataset, counter: SkippedExampleCounter, *,
               max_consecutive: int = DEFAULT_MAX_CONSECUTIVE_UNREADABLE,
               source_description: str = 'the source'):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive
    self._source_description = source_description

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipCorruptExamplesDatasetIterator(self._parent.__iter__(), self._counter,
                                               self._max_consecutive, self._source_description)

  def __str__(self) -> str:
    return 'SkipCorruptExamplesIterDataset'


# --- Splitting batches between processes -------------------------------------

class ProcessShare(grain.MapDataset):
  """One process's rows of every global batch, in order.

  Global batch b holds elements [b*G, (b+1)*G) of the parent, G = count * L;
  process i reads rows [i*L, (i+1)*L) of each. Concatenating the processes'
  batches therefore gives exactly the global batch a single process would read.
  """

  def __init__(self, parent: grain.MapDataset, rows_per_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._rows = rows_per_batch
    self._process_index = process_index
    self._process_count = process_count

  def __len__(self) -> int:
    return len(self._parent) // self._process_count

  def parent_index(self, index: int) -> int:
    batch, row = divmod(int(index), self._rows)
    return (batch * self._process_count + self._process_index) * self._rows + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return (f'ProcessShare(process {self._process_index} of {self._process_count},'
            f' {self._rows} rows per batch)')


# --- The pipeline ------------------------------------------------------------

def _derive_seed(*seeds: int) -> int:
  """Mixes seeds into one 32-bit seed (the range Grain accepts)."""
  return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])


class InputPipeline:
  """Iterates over global batches ``{'image': uint8 (B, S, S, 3), 'label': int32 (B,)}``.

  With ``config.labels.vocabulary`` set, batches also hold ``'label_ids'``: int32
  ``(B, max_labels_per_example)``, each example's WSP label ids padded with -1
  (all -1 for an example with no known label). With ``config.text.tokenizer``
  set, they hold ``'text_tokens'``: int32 ``(B, max_length)``, each example's
  caption tokenised (see ``Tokenizer.tokenize``).

  ``B`` is ``global_batch_size``; each process loads its own
  ``B / process_count`` examples and the batch dimension is sharded over the
  mesh axes ('data', 'fsdp'). Images stay uint8: the model normalises on the
  device, which keeps host-to-device traffic 4x smaller than float32.

  Training pipelines shuffle and repeat forever; eval pipelines (``train=False``)
  read the source once, in order, and stop. Both drop the final incomplete
  batch, because global arrays need a fixed shape.
  """

  def __init__(
      self,
      data_config: ml_collections.ConfigDict,
      *,
      global_batch_size: int,
      mesh: jax.sharding.Mesh,
      train: bool = True,
      seed: int = 0,
  ):
    process_count = jax.process_count()
    batch_shards = sharding_lib.num_batch_shards(mesh)
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(
          f'global_batch_size={global_batch_size} must be a positive multiple of'
          f' the number of processes ({process_count}), since each process loads'
          ' an equal share of every batch.')
    if global_batch_size % batch_shards:
      raise ValueError(
          f'global_batch_size={global_batch_size} must be divisible by the'
          f' {batch_shards} devices along mesh axes {sharding_lib.BATCH_AXES} (mesh shape'
          f' {dict(mesh.shape)}), which split the batch dimension.')

    # .get: configs written before the limit existed.
    max_consecutive_unreadable = data_config.get('max_consecutive_unreadable',
                                                 DEFAULT_MAX_CONSECUTIVE_UNREADABLE)
    if not isinstance(max_consecutive_unreadable, int) or max_consecutive_unreadable < 1:
      raise ValueError(
          f'config.data.max_consecutive_unreadable={max_consecutive_unreadable!r} must be a '
          f'positive integer (default {DEFAULT_MAX_CONSECUTIVE_UNREADABLE}).')

    self._source = sources.build_source(data_config)
    # Loaded once here; every example is encoded with the same vocabulary.
    self._label_vocabulary = _load_label_vocabulary(data_config)
    self._text_tokenizer = _load_text_tokenizer(data_config)
    self._sharding = sharding_lib.batch_sharding(mesh)
    self._skipped = SkippedExampleCounter()
    per_process_batch = global_batch_size // process_count

    dataset = grain.MapDataset.source(self._source)
    self._pseudo_labelled = None
    if train:
      dataset = dataset.shuffle(seed=_derive_seed(data_config.seed, seed, _SHUFFLE_STREAM))
      dataset = dataset.repeat(None)
      if pseudo_label_folder(data_config):
        dataset = self._mixed_with_pseudo_labels(dataset, data_config, global_batch_size, seed)
    else:
      # A fixed order, independent of the run's seed, so evaluations compare
      # across runs; shuffled so the first N examples span every class (image
      # folders are listed class by class).
      dataset = dataset.shuffle(seed=_derive_seed(data_config.seed, _EVAL_SHUFFLE_STREAM))
      # Whole global batches only, so every process reads the same number of
      # batches and none waits at the end of the epoch for a batch that never comes.
      dataset = dataset[:len(dataset) // global_batch_size * global_batch_size]
    dataset = with_label_ids_and_text_tokens(dataset, data_config, self._label_vocabulary,
                                             self._text_tokenizer)
    if train:
      # Checked here, so a bad name or setting fails before any image is read.
      augment_settings = dict(
          randaugment_ops=data_config.randaugment_ops,
          randaugment_magnitude=float(data_config.randaugment_magnitude),
          randaugment_magnitude_std=float(data_config.randaugment_magnitude_std),
          erasing_prob=float(data_config.erasing_prob),
          scale_jitter=tuple(float(s) for s in data_config.scale_jitter))
      augment_lib.check_augment_settings(**augment_settings)
      dataset = dataset.random_map(
          functools.partial(
              augment_for_training,
              image_size=data_config.image_size,
              crop_scale=tuple(data_config.crop_scale),
              augment=augment_lib.parse_augment(data_config.augment),
              # .get: configs written before the option existed decode whole.
              decode_at_crop_scale=data_config.get('decode_at_crop_scale', False),
              **augment_settings),
          seed=_derive_seed(data_config.seed, seed, _AUGMENT_STREAM))
    else:
      dataset = dataset.map(functools.partial(
          prepare_for_eval, image_size=data_config.image_size,
          crop_fraction=data_config.get('eval_crop_fraction', 1.0)))
    # After the random maps, so an example's crop depends on its global index
    # alone, not on how many processes share the run. Lazy: each process only
    # decodes its own rows.
    dataset = ProcessShare(dataset, per_process_batch, jax.process_index(), process_count)
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=num_reader_threads(data_config),
        prefetch_buffer_size=data_config.prefetch_buffer_size))
    iter_dataset = SkipCorruptExamplesIterDataset(
        iter_dataset, self._skipped, max_consecutive=max_consecutive_unreadable,
        source_description=describe_source(data_config))
    iter_dataset = iter_dataset.map(functools.partial(
        select_device_features, feature_names=device_feature_names(data_config, train)))
    iter_dataset = iter_dataset.batch(per_process_batch, drop_remainder=True)
    self._iterator = iter_dataset.__iter__()

  def _mixed_with_pseudo_labels(self, labelled: grain.MapDataset, data_config,
                                global_batch_size: int, seed: int) -> grain.MapDataset:
    """`labelled` (shuffled, repeated) mixed with the pseudo-labelled images, each global
    batch holding exactly batch * fraction of them (Grain's deterministic mix)."""
    folder = pseudo_label_folder(data_config)
    fraction = float(data_config.pseudo_labels.fraction)
    if not 0.0 < fraction < 1.0 or abs(global_batch_size * fraction
                                       - round(global_batch_size * fraction)) > 1e-9:
      raise ValueError(
          f'config.data.pseudo_labels.fraction={fraction}: must be in (0, 1) and give a whole '
          f'number of rows of the global batch of {global_batch_size} (e.g. 0.5 for 1:1).')
    metadata = pseudo_labels_lib.read_metadata(folder)
    unlabelled = sources.build_source(
        pseudo_labels_lib.unlabelled_data_config(data_config, metadata))
    width = pseudo_label_width(data_config)
    self._pseudo_labelled = pseudo_labels_lib.PseudoLabelledSource(folder, unlabelled,
                                                                    width=width)
    if self._pseudo_labelled.num_classes != self._source.num_classes and not (
        _label_vocabulary_path(data_config)):
      raise ValueError(
          f'The pseudo-labels in {folder!r} have {self._pseudo_labelled.num_classes} classes '
          f'(the teacher\'s), the labelled source {self._source.num_classes}: the student '
          'learns one set of classes. Pseudo-label with a teacher of the same classes.')
    pseudo = grain.MapDataset.source(self._pseudo_labelled)
    pseudo = pseudo.shuffle(seed=_derive_seed(data_config.seed, seed, _PSEUDO_SHUFFLE_STREAM))
    pseudo = pseudo.repeat(None).map(as_pseudo_labelled_row)
    labelled = labelled.map(functools.partial(as_human_labelled_row, width=width))
    return grain.MapDataset.mix([labelled, pseudo], weights=[1.0 - fraction, fraction])

  def __iter__(self) -> InputPipeline:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return self.to_global_arrays(self.next_local_numpy())

  def to_global_arrays(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's numpy batch -> global arrays, batch-sharded over the mesh."""
    return {
        name: jax.make_array_from_process_local_data(self._sharding, array)
        for name, array in local_batch.items()
    }

  def next_local_numpy(self) -> dict[str, np.ndarray]:
    """The next batch of this process as numpy arrays (for evaluators and tests)."""
    return next(self._iterator)

  @property
  def grain_iterator(self) -> grain.DatasetIterator:
    """The underlying Grain iterator; checkpoint it with grain.checkpoint.CheckpointSave/Restore."""
    return self._iterator

  @property
  def corrupt_images_skipped(self) -> int:
    """Unreadable images skipped so far by this process (a file counts once per epoch read)."""
    return self._skipped.count

  @property
  def label_vocabulary(self) -> labels_lib.LabelVocabulary | None:
    """The WSP label vocabulary ('label_ids' index its labels), or None when WSP labels are off."""
    return self._label_vocabulary

  @property
  def text_tokenizer(self) -> tokenizer_lib.Tokenizer | None:
    """The tokenizer of 'text_tokens', or None when text is off."""
    return self._text_tokenizer

  @property
  def num_classes(self) -> int:
    return self._source.num_classes

  @property
  def class_names(self) -> list[str]:
    return self._source.class_names


# --- Every example once, in order (evaluators, pseudo-labelling) ---------------

# Keys travel between processes as fixed-width UTF-8 rows of this many bytes.
MAX_KEY_BYTES = 512
# A row past the examples: it goes through every map, then is masked out.
_PADDING_ROW = {'padding': True, 'caption': '', 'hashtags': []}
# Per-row values every process gets, for all rows of each global batch.
ROW_FIELDS = ('valid', 'index', 'label', 'key_bytes')


class _IndexedRows(grain.MapDataset):
  """Row r is example indices[r] of `source` (with its 'index'); rows past them are padding."""

  def __init__(self, source, indices: np.ndarray, length: int):
    super().__init__()
    self._source, self._indices, self._length = source, indices, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, row):
    if isinstance(row, slice):
      return self.slice(row)
    if row >= len(self._indices):
      return _PADDING_ROW
    index = int(self._indices[row])
    return {**self._source[index], 'index': index}

  def __str__(self) -> str:
    return f'IndexedRows({len(self._indices)} examples, {self._length} rows)'


def _encode_key(key: str) -> np.ndarray:
  encoded = key.encode('utf-8')
  if len(encoded) > MAX_KEY_BYTES:
    raise ValueError(f'Example key {key[:80]!r}... is longer than {MAX_KEY_BYTES} bytes.')
  row = np.zeros(MAX_KEY_BYTES, np.uint8)
  row[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  return row


def decode_key(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b'\0').decode('utf-8')


def _ordered_row(example: dict[str, Any], *, image_size: int,
                 crop_fraction: float) -> dict[str, np.ndarray]:
  """A centre-cropped row with ROW_FIELDS; padding and unreadable images are rows with
  valid=False (the batch keeps its shape on every process). Label ids and text tokens,
  when the maps before added them, are kept."""
  blank = np.zeros((image_size, image_size, 3), np.uint8)
  extra = {name: example[name] for name in (LABEL_IDS_FEATURE, TEXT_TOKENS_FEATURE)
           if name in example}
  if example.get('padding'):
    return {'image': blank, 'valid': np.bool_(False), 'index': np.int64(-1),
            'label': np.int32(-1), 'key_bytes': np.zeros(MAX_KEY_BYTES, np.uint8), **extra}
  prepared = prepare_for_eval(example, image_size=image_size, crop_fraction=crop_fraction)
  valid = not isinstance(prepared, transforms.SkippedExample)
  if not valid:
    logging.warning('Skipping unreadable image %s (%s).', prepared.path, prepared.reason)
  return {'image': prepared['image'] if valid else blank, 'valid': np.bool_(valid),
          'index': np.int64(example['index']), 'label': np.int32(example.get('label', -1)),
          'key_bytes': _encode_key(pseudo_labels_lib.example_key(example, example['index'])),
          **extra}


def eval_order(data_config: ml_collections.ConfigDict, num_examples: int) -> np.ndarray:
  """The fixed order evaluators read a split in: shuffled once, independent of the run's
  seed (so evaluations compare across runs), so the first N span every class (image
  folders are listed class by class)."""
  seed = _derive_seed(data_config.seed, _EVAL_SHUFFLE_STREAM)
  return np.random.default_rng(seed).permutation(num_examples)


def ordered_batches(source, indices: np.ndarray, data_config: ml_collections.ConfigDict, *,
                    global_batch_size: int, mesh: jax.sharding.Mesh):
  """Global batches of the examples `indices` of `source`, in order, each exactly once.

  Yields (batch: the device features of `device_feature_names(data_config,
  train=False)` as batch-sharded global arrays; rows: host numpy ROW_FIELDS of
  every row of the global batch, identical on every process). The last batch
  is padded with rows whose 'valid' is False, and an unreadable image is such a
  row too, so every process reads the same number of whole batches and none
  waits in a collective for a batch that never comes.
  """
  process_count = jax.process_count()
  per_process = global_batch_size // process_count
  length = -(-len(indices) // global_batch_size) * global_batch_size
  dataset = _IndexedRows(source, np.asarray(indices), length)
  dataset = with_label_ids_and_text_tokens(dataset, data_config,
                                           _load_label_vocabulary(data_config),
                                           _load_text_tokenizer(data_config))
  dataset = dataset.map(functools.partial(
      _ordered_row, image_size=data_config.image_size,
      crop_fraction=data_config.get('eval_crop_fraction', 1.0)))
  dataset = ProcessShare(dataset, per_process, jax.process_index(), process_count)
  batches = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_reader_threads(data_config),
      prefetch_buffer_size=data_config.prefetch_buffer_size)).batch(per_process)
  sharding = sharding_lib.batch_sharding(mesh)
  device_names = device_feature_names(data_config, train=False)
  for local in batches:
    batch = {name: jax.make_array_from_process_local_data(sharding, local[name])
             for name in device_names}
    rows = {name: np.asarray(multihost_utils.process_allgather(local[name], tiled=True))
            if process_count > 1 else local[name] for name in ROW_FIELDS}
    yield batch, rows
