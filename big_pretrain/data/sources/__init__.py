"""Random-access data sources for ``grain.MapDataset.source``: the registry.

One module per source: synthetic.py (embedded shapes, no files),
image_folder.py, array_record.py (the converter's shards), tfds_source.py,
subset.py (a fixed part of another source) and pseudo_labelled.py (a teacher's
labels joined to unlabelled images, mixed into a self-training student's
batches); source_texts.py reads a source's texts for the vocabulary build
command. source.py states the contract every source keeps.

`build_source(config.data)` picks one by config.data.source; `second_source`
gives what is mixed into the training batches beside it, if anything;
`DATA_KEYS` declares the keys of config.data that choose and configure the
source (each source's own keys in its module).

A new source: a module here with a class that keeps the contract and its keys
(`DATA_KEYS`), its name in SOURCE_NAMES, a branch in `build_source`, and its
checks in `check_config`.
"""

from __future__ import annotations

from big_pretrain import schema
from big_pretrain.data.sources import array_record
from big_pretrain.data.sources import image_folder
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data.sources import subset
from big_pretrain.data.sources import synthetic
from big_pretrain.data.sources import tfds_source
from big_pretrain.data.sources.array_record import ArrayRecordSource
from big_pretrain.data.sources.image_folder import ImageFolder
from big_pretrain.data.sources.source import SPLITS, SecondSource, Source
from big_pretrain.data.sources.subset import SubsetSource
from big_pretrain.data.sources.synthetic import SyntheticShapes
from big_pretrain.data.sources.tfds_source import TfdsSource
from big_pretrain.errors import ConfigError

SOURCE_NAMES = ('synthetic', 'image_folder', 'array_record', 'tfds')
# The sources read from config.data.path: what the path must hold, and the class.
PATH_SOURCES = {
    'image_folder': ('a folder of class subfolders', ImageFolder),
    'array_record': ('a folder of ArrayRecord shards written by `python -m'
                     ' big_pretrain.data.convert`', ArrayRecordSource),
}

# The keys of config.data that choose the images: the source, and each source's own keys.
DATA_KEYS = schema.Group(
    'which images a stage reads',
    source=schema.Key('synthetic', schema.one_of(*SOURCE_NAMES), 'where the images come from'),
    path=schema.Key(None, schema.OPTIONAL_TEXT,
                    'image_folder: a folder of class subfolders; array_record: a folder of '
                    'shards written by `python -m big_pretrain.data.convert` (or a glob of '
                    'shards)', type=str),
    test_path=schema.Key(None, schema.OPTIONAL_TEXT,
                         'held-out images for evaluators, as `path` (synthetic data draws a '
                         "disjoint 'test' stream; tfds reads tfds_test_split)", type=str),
    split=schema.Key('train', schema.one_of(*SPLITS), "which of the two a pipeline reads"),
    **synthetic.DATA_KEYS,
    **tfds_source.DATA_KEYS,
    subset=subset.DATA_KEYS,
    pseudo_labels=pseudo_labelled.DATA_KEYS,
)


def check_config(data, path: str) -> None:
  """Raises ConfigError when config.data lacks what its source needs (beside each key's own
  rule): an image folder's or an ArrayRecord folder's path, a TFDS dataset's name."""
  if data.source == 'tfds':
    tfds_source.check_config(data, path)
  elif data.source == 'array_record' and not data.path:
    raise ConfigError(
        f"{path}.data.path is not set, and {path}.data.source='array_record' needs it. Point "
        'it at a folder written by `python -m big_pretrain.data.convert --input=IMAGES_OR_TARS '
        '--output=DIR`, e.g. --config.data.path=DIR.')
  elif data.source in PATH_SOURCES and not data.path:
    raise ConfigError(
        f'{path}.data.path is not set, and {path}.data.source={data.source!r} needs it. '
        'Point it at your data, e.g. --config.data.path=/data/imagenet/train (a folder '
        'of class subfolders of JPEG/PNG images, optional .txt captions beside them), '
        'or try the embedded synthetic data with the ":demo" config variant '
        '(e.g. --config=configs/mae.py:demo).')


def check_has_data(source: str, path: str) -> None:
  """Raises FileNotFoundError or ValueError, saying why, when a local `path` of an
  'image_folder' or 'array_record' source holds no data; cheap, before any compile.

  An image folder counts as holding data once one image is found in a class
  subfolder; other sources pass.
  """
  if source == 'array_record':
    array_record.array_record_shards(path)
  elif source == 'image_folder':
    image_folder.check_has_images(path)


def build_source(data_config) -> Source:
  """Builds the source named by ``data_config.source``; its training split limited to
  ``data_config.subset``'s part when that is set."""
  source = _build_whole_source(data_config)
  subset_config = data_config.subset
  if data_config.split == 'train' and (subset_config.fraction < 1.0 or subset_config.complement):
    source = SubsetSource(source, subset_config.fraction, complement=subset_config.complement,
                          seed=data_config.seed)
  return source


def second_source_key(data_config) -> str | None:
  """The group of config.data that mixes a second source into the training batches
  (source.SecondSource), when it is set: 'pseudo_labels'; else None."""
  pseudo_labels = data_config.pseudo_labels
  return pseudo_labelled.PseudoLabelMix.config_key if (
      pseudo_labels.stage or pseudo_labels.path) else None


def second_source(data_config) -> SecondSource | None:
  """What is mixed into the training batches beside config.data's source, or None. (A chain
  has put an earlier stage's folder in config.data.pseudo_labels.path by now.)"""
  if data_config.pseudo_labels.path:
    return pseudo_labelled.PseudoLabelMix.from_data_config(data_config)
  return None


def _build_whole_source(data_config) -> Source:
  split = data_config.split
  if data_config.source == 'synthetic':
    return SyntheticShapes(
        num_examples=data_config.num_examples,
        image_size=data_config.source_image_size,
        seed=data_config.seed,
        split=split,
        label=data_config.synthetic_label)
  if data_config.source in PATH_SOURCES:
    _, source_class = PATH_SOURCES[data_config.source]
    return source_class(data_config.test_path if split == 'test' else data_config.path)
  split_key = 'tfds_test_split' if split == 'test' else 'tfds_train_split'
  return TfdsSource(
      data_config.tfds_name,
      split=data_config[split_key],
      data_dir=data_config.tfds_data_dir,
      image_key=data_config.tfds_image_key,
      label_key=data_config.tfds_label_key,
      caption_key=data_config.tfds_caption_key,
      split_key=split_key)


__all__ = ['DATA_KEYS', 'PATH_SOURCES', 'SOURCE_NAMES', 'SPLITS', 'SecondSource', 'Source',
           'build_source', 'check_config', 'check_has_data', 'second_source',
           'second_source_key']
