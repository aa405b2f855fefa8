"""Random-access data sources for ``grain.MapDataset.source``: the registry, SOURCES.

One module per source, each with a class that keeps the contract of source.py
(`Source`: the examples; `RegisteredSource`: its name, its keys of config.data,
its checks, how it is built from config.data): synthetic.py (embedded shapes,
no files), image_folder.py, array_record.py (the converter's shards) and
tfds_source.py. Adding a source is its module and one line in SOURCES below:
`build_source`, `check_config`, `check_has_data` and config validation ask the
table, and `DATA_KEYS` gathers each registered source's keys when a config is
built or validated, so a source registered later (a test's) has its keys and
its name accepted. Beside them, and not entries: subset.py (a fixed part of
another source) and pseudo_labelled.py (a teacher's labels joined to unlabelled
images, mixed into a self-training student's batches), each with its group of
keys; source_texts.py reads a source's texts for the vocabulary build command.

A source's own keys sit flat in config.data ('num_examples', 'tfds_name', ...),
not in a group per source (config.data.tfds.name): the shipped configs, the
README's command lines and users' scripts set them so, and every workdir's
recorded config.json holds them so, which a resume compares with the config it
is given. Prefixing a new source's keys with its name keeps them apart; a name
two sources declare is refused when the keys are gathered.

`build_source(config.data)` builds the one config.data.source names;
`second_source` gives what is mixed into the training batches beside it, if
anything.
"""

from __future__ import annotations

from big_pretrain import schema
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data.sources import subset
from big_pretrain.data.sources.array_record import ArrayRecordSource
from big_pretrain.data.sources.image_folder import ImageFolder
from big_pretrain.data.sources.source import SPLITS, RegisteredSource, SecondSource, Source
from big_pretrain.data.sources.subset import SubsetSource
from big_pretrain.data.sources.synthetic import SyntheticShapes
from big_pretrain.data.sources.tfds_source import TfdsSource
from big_pretrain.registry import Registry

# config.data.source -> its class.
SOURCES: Registry[type[RegisteredSource]] = Registry(
    'data source', [SyntheticShapes, ImageFolder, ArrayRecordSource, TfdsSource])

# The keys of config.data every source shares: which source, and where its files are.
_SHARED_KEYS = schema.Group(
    'which source, and where its files are',
    source=schema.Key('synthetic', schema.registered_in(SOURCES), 'where the images come from'),
    path=schema.Key(None, schema.OPTIONAL_TEXT,
                    'image_folder: a folder of class subfolders; array_record: a folder of '
                    'shards written by `python -m big_pretrain.data.convert` (or a glob of '
                    'shards)', type=str),
    test_path=schema.Key(None, schema.OPTIONAL_TEXT,
                         'held-out images for evaluators, as `path` (synthetic data draws a '
                         "disjoint 'test' stream; tfds reads tfds_test_split)", type=str),
    split=schema.Key('train', schema.one_of(*SPLITS), "which of the two a pipeline reads"),
)
_PART_KEYS = schema.Group(
    'which part of the images, and what is mixed in',
    subset=subset.DATA_KEYS,
    pseudo_labels=pseudo_labelled.DATA_KEYS,
)


def _keys_in_order() -> list[schema.Group]:
  return [_SHARED_KEYS, *(source.data_keys for source in SOURCES), _PART_KEYS]


# The keys of config.data that choose the images: the shared ones, each registered source's
# own (gathered from SOURCES whenever they are read), the part and the second source.
DATA_KEYS = schema.GatheredGroup('which images a stage reads', _keys_in_order)


def check_config(data, path: str) -> None:
  """Raises ConfigError when config.data lacks what its source needs (beside each key's own
  rule), e.g. an image folder's path or a TFDS dataset's name: the source's check_config."""
  SOURCES[data.source].check_config(data, path)


def check_has_data(source: str, path: str) -> None:
  """Raises FileNotFoundError or ValueError, saying why, when a local `path` of `source`
  holds no data (an image folder: no image in a class subfolder; an ArrayRecord folder: no
  whole set of shards); cheap, before any compile. Sources that read no path pass."""
  SOURCES[source].check_has_data(path)


def build_source(data_config) -> Source:
  """Builds the source named by ``data_config.source``; its training split limited to
  ``data_config.subset``'s part when that is set."""
  source = SOURCES[data_config.source].from_config(data_config, data_config.split)
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


__all__ = ['DATA_KEYS', 'SOURCES', 'SPLITS', 'ArrayRecordSource', 'ImageFolder',
           'RegisteredSource', 'SecondSource', 'Source', 'SubsetSource', 'SyntheticShapes',
           'TfdsSource', 'build_source', 'check_config', 'check_has_data', 'second_source',
           'second_source_key']
