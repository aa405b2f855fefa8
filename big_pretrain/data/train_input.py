"""The training input: source -> shuffle -> shard -> augment -> batch -> global arrays.

Per process::

  MapDataset.source(source)
    .shuffle(seed)                        # reshuffled every epoch
    .repeat(None)
    -> MapDataset.mix with a second source  # only when config.data gives one (self-training)
    .map(add_label_ids)                   # only when config.labels.vocabulary is set (WSP)
    .map(add_text_tokens)                 # only when config.text.tokenizer is set (FLIP)
    .random_map(decode, config.augment)   # e.g. crop+flip (data/augment.py)
    -> BatchColumnReader                  # this process's columns of every global batch,
                                          # read in num_threads threads; an unreadable
                                          # image is replaced by its column's next one
       .map(select_device_features), stacked into this process's rows

and each per-process batch becomes a global ``jax.Array`` whose batch dimension
is sharded over the mesh axes ('data', 'fsdp'). The maps are in example_maps.py,
the reader and the data position in batch_columns.py, the skip counting in
corrupt_images.py, the features in batch_features.py.

All randomness (shuffle order, crops, flips, RandAugment, erasing) is a
deterministic function of the seeds and the element's global index, so restoring
the reader's position resumes the exact same stream of batches, and a run on N
processes sees the same global batches, row for row, as a run on one: also after
skipping unreadable images, and also when it resumes a position saved by another
number of processes.

Evaluators and the pseudo-label job read every example of a split exactly once
through eval_input.py instead.
"""

from __future__ import annotations

import functools

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.data import augment as augment_lib
from big_pretrain.data import batch_columns
from big_pretrain.data import batch_features
from big_pretrain.data import corrupt_images
from big_pretrain.data import example_maps
from big_pretrain.data import process_share
from big_pretrain.data import seeds
from big_pretrain.data import sources
from big_pretrain.data.sources import SecondSource
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib


class InputPipeline:
  """Iterates over global batches ``{'image': uint8 (B, S, S, 3), 'label': int32 (B,)}``.

  With ``config.labels.vocabulary`` set, batches also hold ``'label_ids'``: int32
  ``(B, max_labels_per_example)``, each example's WSP label ids padded with -1
  (all -1 for an example with no known label). With ``config.text.tokenizer``
  set, they hold ``'text_tokens'``: int32 ``(B, max_length)``, each example's
  caption tokenised (see ``Tokenizer.tokenize``).

  With a second source mixed in (``sources.second_source``: a self-training
  student's pseudo-labelled images), exactly its ``fraction`` of every batch
  comes from it, and every row carries its features (``feature_shapes``).

  ``B`` is ``global_batch_size`` (config validation has checked that the
  processes and the mesh's batch axes divide it); each process loads its own
  ``B / process_count`` examples and the batch dimension is sharded over the
  mesh axes ('data', 'fsdp'). Images stay uint8: the model normalizes on the
  device, which keeps host-to-device traffic 4x smaller than float32.

  It shuffles and repeats forever; evaluation reads every example of a split
  once through eval_input.py instead. With `example_keys_file`, every batch's keys are
  appended to it (batch_columns.py; config.log.example_keys).
  """

  def __init__(
      self,
      data_config: ml_collections.ConfigDict,
      *,
      global_batch_size: int,
      mesh: jax.sharding.Mesh,
      seed: int = 0,
      example_keys_file: str | None = None,
  ):
    self._source = sources.build_source(data_config)
    self._label_vocabulary, self._text_tokenizer = batch_features.load_text_features(data_config)
    self._sharding = sharding_lib.batch_sharding(mesh)

    dataset = grain.MapDataset.source(self._source)
    dataset = dataset.shuffle(seed=seeds.derive_seed(data_config.seed, seed, seeds.SHUFFLE_STREAM))
    dataset = dataset.repeat(None)
    if (second_source := sources.second_source(data_config)) is not None:
      dataset = self._mixed_with(dataset, second_source, data_config.seed, seed)
    dataset = example_maps.with_label_ids_and_text_tokens(
        dataset, data_config, self._label_vocabulary, self._text_tokenizer)
    dataset = dataset.random_map(
        functools.partial(
            example_maps.augment_for_training,
            image_size=data_config.image_size,
            crop_scale=tuple(data_config.crop_scale),
            augment=augment_lib.parse_augment(data_config.augment),
            decode_at_crop_scale=data_config.decode_at_crop_scale,
            randaugment_ops=data_config.randaugment_ops,
            randaugment_magnitude=float(data_config.randaugment_magnitude),
            randaugment_magnitude_std=float(data_config.randaugment_magnitude_std),
            erasing_prob=float(data_config.erasing_prob),
            scale_jitter=tuple(float(s) for s in data_config.scale_jitter)),
        seed=seeds.derive_seed(data_config.seed, seed, seeds.AUGMENT_STREAM))
    # Each process reads its own columns of every global batch, after the random maps, so
    # an example's crop and its place in the batches depend on its global index alone, not
    # on how many processes share the run (batch_columns.py).
    self._reader = batch_columns.BatchColumnReader(
        dataset,
        batch_columns.ColumnLayout(global_batch_size, jax.process_index(), jax.process_count()),
        to_row=functools.partial(
            batch_features.select_device_features,
            feature_names=batch_features.device_feature_names(data_config)),
        num_threads=process_share.num_reader_threads(data_config),
        elements_ahead=data_config.prefetch_buffer_size,
        report=corrupt_images.SkipReport(
            max_consecutive=data_config.max_consecutive_unreadable,
            source_description=corrupt_images.describe_source(data_config)),
        example_keys_file=example_keys_file)

  def _mixed_with(self, main: grain.MapDataset, second_source: SecondSource, data_seed: int,
                  seed: int) -> grain.MapDataset:
    """`main` (shuffled, repeated) mixed with the second source's examples (shuffled,
    repeated): every global batch holds exactly batch * fraction of them (Grain's
    deterministic mix; validation has checked the rows are whole)."""
    mixed = grain.MapDataset.source(second_source.build(self._source, sources.build_source))
    mixed = mixed.shuffle(
        seed=seeds.derive_seed(data_seed, seed, seeds.SECOND_SOURCE_SHUFFLE_STREAM))
    mixed = mixed.repeat(None).map(second_source.as_mixed_row)
    main = main.map(second_source.as_main_row)
    fraction = second_source.fraction
    return grain.MapDataset.mix([main, mixed], weights=[1.0 - fraction, fraction])

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
    return next(self._reader)

  @property
  def local_batches(self) -> batch_columns.BatchColumnReader:
    """This process's numpy batches and their position (get_state / set_state, and
    global_position for a checkpoint)."""
    return self._reader

  def close(self) -> None:
    """Stops the reader threads."""
    self._reader.close()

  @property
  def corrupt_records_skipped(self) -> int:
    """Records skipped because their bytes failed their own hash (damaged in the file)."""
    return self._reader.records_skipped

  @property
  def corrupt_images_skipped(self) -> int:
    """Unreadable images skipped so far in this process's columns (a file counts once per
    epoch read)."""
    return self._reader.images_skipped

  def skipped_in_every_process(self) -> tuple[int, int]:
    """(unreadable images, damaged records) skipped so far by all processes together; a
    collective: every process calls it at the same step."""
    counts = np.array([self.corrupt_images_skipped, self.corrupt_records_skipped], np.int32)
    if jax.process_count() > 1:
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    return int(counts[0]), int(counts[1])

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
