"""config.data: every key (declared by the module that reads it), and the checks across them.

`DATA_KEYS` gathers the declarations: the source and each registered source's
own keys (sources/), the augmentation (augment.py), WSP's labels
(text/labels.py), the captions' tokenizer (text/tokenizer_files.py), and the
input pipeline's own, below. `check_config` runs the checks that span keys;
`check_data_exists` looks at the files the keys name. Both run once, in config
validation, before anything compiles: the input code trusts what they passed.
"""

from __future__ import annotations

from big_pretrain import schema
from big_pretrain.data import augment
from big_pretrain.data import corrupt_images
from big_pretrain.data import sources
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data.text import labels
from big_pretrain.data.text import tokenizer_files
from big_pretrain.errors import ConfigError
from big_pretrain.storage.files import is_bucket

# The input pipeline's own keys, and those of the modules it calls.
_INPUT_KEYS = schema.Group(
    'how the images are prepared, and what goes with them',
    seed=schema.Key(0, schema.NON_NEGATIVE_COUNT,
                    'the dataset seed: synthetic content, shuffle order, augmentation'),
    image_size=schema.Key(224, schema.COUNT, "the model's input size after crop and resize"),
    **augment.DATA_KEYS,
    eval_crop_fraction=schema.Key(
        1.0, schema.within(0, 1, low_open=True),
        "evaluation: a centred square of this share of the shorter side, resized to "
        "image_size (0.875: ImageNet's \"resize 256, crop 224\")"),
    num_threads=schema.Key(
        None, schema.at_least(1, integer=True, or_none=True),
        'threads decoding and augmenting images; None: one per CPU core this process '
        'may use, at most 16 (more threads than cores slow the step on a CPU)', type=int),
    max_consecutive_unreadable=schema.Key(
        corrupt_images.DEFAULT_MAX_CONSECUTIVE_UNREADABLE, schema.COUNT,
        'unreadable images are skipped; this many in a row (on one process) stop the run, '
        'naming some of them'),
    prefetch_buffer_size=schema.Key(64, schema.NON_NEGATIVE_COUNT,
                                    'examples prepared ahead, per process (training reads '
                                    'at least a batch ahead)'),
    device_prefetch=schema.Key(2, schema.NON_NEGATIVE_COUNT,
                               'training batches copied to the devices ahead of the step, in '
                               'a background thread; 0: in the loop'),
    labels=labels.DATA_KEYS,
    text=tokenizer_files.DATA_KEYS,
)


def _keys_in_order() -> list[schema.Group]:
  return [sources.DATA_KEYS, _INPUT_KEYS]


# Gathered when read, as sources.DATA_KEYS is: a source registered later has its keys here.
DATA_KEYS = schema.GatheredGroup(
    "a stage's input: which images, how they are prepared, and what goes with them",
    _keys_in_order)


def default_data_config():
  """config.data with every key at its default."""
  return DATA_KEYS.defaults()


def check_config(data, path: str = 'config') -> None:
  """Raises ConfigError when config.data's keys, each valid alone, do not fit together."""
  sources.check_config(data, path)
  augment.check_config(data, path)


def check_data_exists(data, path: str = 'config') -> None:
  """Raises ConfigError when a local data.path or data.test_path holds no images or shards,
  a local pseudo_labels.path no finished pseudo-labels, or a local label vocabulary or
  tokenizer does not read (they are small: read once now, a damaged one is named before any
  compile, not after). A bucket's are found when read."""
  for key in ('path', 'test_path'):
    location = data.get(key)
    if not location or is_bucket(location):
      continue
    try:
      sources.check_has_data(data.source, location)
    except (OSError, ValueError) as error:
      raise ConfigError(f'{path}.data.{key}: {error}') from None
  # A chain fills pseudo_labels.path from pseudo_labels.stage once that stage has run.
  pseudo_labels = data.pseudo_labels.path if 'pseudo_labels' in data else None
  if pseudo_labels and not is_bucket(pseudo_labels):
    try:
      pseudo_labelled.read_metadata(pseudo_labels)
    except (OSError, ValueError) as error:  # UserFacingError's kinds are ValueErrors
      raise ConfigError(f'{path}.data.pseudo_labels.path: {error}') from None
  files = {'labels.vocabulary': (data.labels.vocabulary, labels.LabelVocabulary.from_file),
           'text.tokenizer': (data.text.tokenizer, tokenizer_files.load_tokenizer)}
  for key, (location, read) in files.items():
    if not location or is_bucket(location):
      continue
    try:
      read(location)
    except (OSError, ValueError, ImportError) as error:  # ImportError: no sentencepiece
      raise ConfigError(f'{path}.data.{key}: {error}') from None
