"""The 'pseudo-labelled' source: a teacher's labels joined to the unlabelled images they are for.

`python main.py` with a pseudo-label stage (big_pretrain/stages/pseudo_label_job.py)
writes a folder of pseudo-label records (data/records.py) plus a `metadata.json`;
a self-training student reads it back here as one more source
(`PseudoLabelledSource`), which joins each record to its image in the unlabelled
source and drops everything that source knows about the image's true class
(label, caption, hashtags). `PseudoLabelMix` mixes it into the student's
training batches, as the second source the input pipeline knows how to mix
(config.data.pseudo_labels).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import ml_collections
import numpy as np

from big_pretrain import schema
from big_pretrain.data import records
from big_pretrain.data.sources import array_record
from big_pretrain.data.sources.source import example_key
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.errors import ConfigError, DamagedFileError, UsageError
from big_pretrain.storage import files as storage

# config.data.pseudo_labels: a self-training student's pseudo-labelled images.
DATA_KEYS = schema.Group(
    "a teacher's pseudo-labelled images, mixed into every training batch beside the "
    'human-labelled ones (a self-training student)',
    stage=schema.Key(None, schema.OPTIONAL_TEXT, 'an earlier pseudo-label stage of the chain',
                     type=str, names_stage='pseudo_label', path_key='path',
                     chain_fills_path=True),
    path=schema.Key(None, schema.OPTIONAL_TEXT, "or a pseudo-label stage's folder", type=str),
    fraction=schema.Key(0.5, schema.within(0, 1, low_open=True, high_open=True),
                        'the share of every batch that is pseudo-labelled (exactly: '
                        'batch_size * fraction must be whole); 0.5: 1:1'),
)

# The keys of config.data that say which images a source holds (not how they are
# augmented or batched): the unlabelled source is rebuilt from these.
SOURCE_KEYS = ('source', 'path', 'tfds_name', 'tfds_data_dir', 'tfds_train_split',
               'tfds_image_key', 'tfds_label_key', 'tfds_caption_key', 'num_examples',
               'source_image_size', 'synthetic_label', 'seed', 'subset')


def read_metadata(folder: str) -> dict[str, Any]:
  """The finished job's metadata.json; a clear error when the folder holds no finished job."""
  path = pathlib.Path(folder) / records.METADATA_FILE
  if not path.is_file():
    raise UsageError(
        f'No finished pseudo-labels in {folder!r} ({records.METADATA_FILE} is missing): run the '
        'pseudo-label stage first (it writes that file last), or point '
        'config.data.pseudo_labels.path at its folder.')
  metadata = storage.read_json(
      str(path), if_damaged='Run the pseudo-label stage into that folder again (the same '
      "command): it writes metadata.json again from the shards' counts without labelling "
      'anything twice.')
  if (metadata.get('format') != records.PSEUDO_LABEL_FORMAT
      or metadata.get('format_version') != records.PSEUDO_LABEL_FORMAT_VERSION):
    raise DamagedFileError(
        f'{path} is not pseudo-label metadata of this version (format '
        f'{metadata.get("format")!r} v{metadata.get("format_version")}; expected '
        f'{records.PSEUDO_LABEL_FORMAT!r} v{records.PSEUDO_LABEL_FORMAT_VERSION}): point '
        'config.data.pseudo_labels.path at a folder the pseudo-label stage wrote.')
  return metadata


def unlabelled_data_config(data_config, metadata: dict) -> ml_collections.ConfigDict:
  """`data_config` (the student's: augmentation, size, threads) reading the images the
  pseudo-labels were made for (the job's source keys, from its metadata)."""
  data = data_config.copy_and_resolve_references()
  for key in SOURCE_KEYS:
    if key in metadata['data']:
      value = metadata['data'][key]
      data[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  data.split = 'train'
  data.labels.vocabulary = None  # Targets come from the teacher, never from the captions.
  return data


class PseudoLabelledSource:
  """The unlabelled images that have pseudo-labels, with the teacher's labels and nothing else.

  Example i is record i of the shards, joined to its image by the record's
  index in `unlabelled` and checked by key (a changed image folder is an
  error, not a silent mislabelling). The true 'label', the caption and the
  hashtags of the unlabelled source are replaced: the student never sees them.
  Examples get 'pseudo_ids' (int32 (width,), -1 padded) and 'pseudo_probs'
  (float32 (width,), 0 padded, summing to 1).
  """

  def __init__(self, folder: str, unlabelled, *, width: int):
    metadata = read_metadata(folder)
    shards = [str(pathlib.Path(folder) / shard['file']) for shard in metadata['shards']
              if shard['num_records']]
    if not shards:
      raise ConfigError(
          f'The pseudo-labels in {folder!r} hold no example: none of the '
          f'{metadata["num_examples"]} unlabelled images passed the teacher\'s confidence '
          f'threshold {metadata["labels"]["threshold"]}. Lower it and run the pseudo-label '
          'stage again (in a new folder).')
    self._records = array_record.open_shards(
        shards, if_damaged=f'Move it aside with its counts file (.json) and {folder}/'
        f'{records.METADATA_FILE}, then run the pseudo-label stage into {folder} again: it '
        'labels that shard again.')
    self._unlabelled = unlabelled
    self._width = width
    self._folder = folder
    self.metadata = metadata

  def __len__(self) -> int:
    return len(self._records)

  @property
  def num_classes(self) -> int:
    return self.metadata['num_classes']

  @property
  def class_names(self) -> list[str]:
    return list(self.metadata.get('class_names') or [])

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = records.decode_pseudo_label_record(self._records[int(index)])
    example = self._unlabelled[record['index']]
    key = example_key(example, record['index'])
    if key != record['key']:
      raise ValueError(
          f'Pseudo-label {int(index)} in {self._folder!r} is for {record["key"]!r}, but the '
          f'unlabelled source\'s example {record["index"]} is {key!r}: the images changed '
          'after pseudo-labelling. Run the pseudo-label stage again.')
    ids = np.full(self._width, -1, np.int32)
    probs = np.zeros(self._width, np.float32)
    count = min(self._width, len(record['label_ids']))
    ids[:count], probs[:count] = record['label_ids'][:count], record['label_probs'][:count]
    image = {name: example[name] for name in ('image', 'image_path', 'image_bytes')
             if name in example}
    return {**image, 'key': record['key'], 'label': -1, 'caption': '', 'hashtags': [],
            'pseudo_ids': ids, 'pseudo_probs': probs / max(probs.sum(), 1e-12)}


@dataclasses.dataclass(frozen=True)
class PseudoLabelMix:
  """The pseudo-labelled images mixed into a student's training batches: exactly `fraction`
  of every global batch. Every row of a mixed batch gets 'is_pseudo' (1 for a
  pseudo-labelled row), 'pseudo_ids' and 'pseudo_probs' (the teacher's classes and
  probabilities; -1 and 0 on a human-labelled row). The input pipeline mixes it as any
  second source (data.sources.SecondSource)."""
  folder: str
  fraction: float
  width: int  # of the 'pseudo_ids' / 'pseudo_probs' rows: the job's top_k (1: hard labels)
  unlabelled_config: ml_collections.ConfigDict
  num_classes_must_match: bool  # no label vocabulary names the student's classes

  config_key = 'pseudo_labels'  # config.data.pseudo_labels

  @classmethod
  def from_data_config(cls, data_config) -> PseudoLabelMix:
    folder = data_config.pseudo_labels.path
    metadata = read_metadata(folder)
    labels = metadata['labels']
    return cls(folder, float(data_config.pseudo_labels.fraction),
               1 if labels['kind'] == 'hard' else int(labels['top_k']),
               unlabelled_data_config(data_config, metadata),
               not labels_lib.configured_vocabulary_path(data_config))

  @property
  def feature_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
    """The device features each row gets: name -> (per-example shape, dtype)."""
    return {'is_pseudo': ((), np.int32), 'pseudo_ids': ((self.width,), np.int32),
            'pseudo_probs': ((self.width,), np.float32)}

  def build(self, main_source, build_source: Callable) -> PseudoLabelledSource:
    """The pseudo-labelled images (the unlabelled source built by `build_source`), checked
    to label the classes `main_source` does."""
    mixed = PseudoLabelledSource(self.folder, build_source(self.unlabelled_config),
                                 width=self.width)
    if self.num_classes_must_match and mixed.num_classes != main_source.num_classes:
      raise ValueError(
          f'The pseudo-labels in {self.folder!r} have {mixed.num_classes} classes (the '
          f"teacher's), the labelled source {main_source.num_classes}: the student learns one "
          'set of classes. Pseudo-label with a teacher of the same classes.')
    return mixed

  def as_main_row(self, example: dict[str, Any]) -> dict[str, Any]:
    """A human-labelled row of a mixed batch: no pseudo-label (is_pseudo 0, ids -1)."""
    return {**example, 'is_pseudo': np.int32(0),
            'pseudo_ids': np.full(self.width, -1, np.int32),
            'pseudo_probs': np.zeros(self.width, np.float32)}

  def as_mixed_row(self, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, 'is_pseudo': np.int32(1)}
