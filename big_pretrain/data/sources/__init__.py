"""Random-access data sources for ``grain.MapDataset.source``, and `build_source`.

One module per source: synthetic.py (embedded shapes, no files),
image_folder.py, array_record.py (the converter's shards), tfds_source.py,
subset.py (a fixed part of another source) and pseudo_labelled.py (a teacher's
labels joined to unlabelled images); source_texts.py reads a source's texts for
the vocabulary build command. `build_source(config.data)` picks one by
config.data.source.

The Source contract, what every source provides (see `Source`):

* ``len(source)``: the number of examples.
* ``source[i]`` for ``0 <= i < len(source)``: an example, a dict with
    'key'       str: names the example, the same in every run (in warnings, and
                to join pseudo-labels to images);
    the image   exactly one of 'image' (uint8 (H, W, 3) pixels), 'image_path'
                (a file) or 'image_bytes' (an encoded image). Sources never decode
                files: the input pipeline does, so that a corrupt image is skipped
                and counted instead of stopping the run;
    'label'     int: the class id in [0, num_classes), or -1 when unknown;
    'caption'   str: '' when there is none;
    'hashtags'  list[str]: the example's tags, e.g. '#circle' (for a source of
                captions, the '#word's of the caption).
  A source may add more (the pseudo-labelled source adds 'pseudo_ids' and
  'pseudo_probs').
* ``class_names`` (list[str], name of label i at i; '0', '1', ... when the labels
  have no names) and ``num_classes`` (int; 0 when the source has no labels).
* Determinism: example i is a pure function of the source's arguments and
  files, the same on every call, thread, process and machine. Grain reads
  any index from any process, in threads, and a resumed run must read the same
  stream, so ``__getitem__`` keeps no state.
* Errors: a missing or empty path, or a bad setting, raises when the source is
  built (FileNotFoundError or ValueError, naming the config key and the fix), so
  a run stops before anything is compiled. ``__getitem__`` does not decode the
  image, so a damaged image never raises there (the input skips it); a damaged
  record does (ValueError, naming where it is).

A new source: a module here with a class that keeps this contract, its name in
SOURCE_NAMES and a branch in `build_source` (its keys in config/defaults.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from big_pretrain.data.sources import array_record
from big_pretrain.data.sources import image_folder
from big_pretrain.data.sources.array_record import ArrayRecordSource
from big_pretrain.data.sources.image_folder import ImageFolder
from big_pretrain.data.sources.subset import SubsetSource
from big_pretrain.data.sources.synthetic import SyntheticShapes
from big_pretrain.data.sources.tfds_source import TfdsSource

# config.data.split: what every source serves ('test' is the held-out split evaluators read).
SPLITS = ('train', 'test')


class Source(Protocol):
  """What every source provides; the module docstring states the contract."""

  class_names: list[str]
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


SOURCE_NAMES = ('synthetic', 'image_folder', 'array_record', 'tfds')
# The sources read from config.data.path: what the path must hold, and the class.
PATH_SOURCES = {
    'image_folder': ('a folder of class subfolders', ImageFolder),
    'array_record': ('a folder of ArrayRecord shards written by `python -m'
                     ' big_pretrain.data.convert`', ArrayRecordSource),
}


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
  subset = data_config.subset
  if data_config.split == 'train' and (subset.fraction < 1.0 or subset.complement):
    source = SubsetSource(source, subset.fraction, complement=subset.complement,
                          seed=data_config.seed)
  return source


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
    what, source_class = PATH_SOURCES[data_config.source]
    if split == 'test':
      if not data_config.test_path:
        raise ValueError(
            'Evaluators need a held-out split: set config.data.test_path to'
            f" {what} (e.g. ImageNet's val), separate from config.data.path.")
      return source_class(data_config.test_path)
    if not data_config.path:
      raise ValueError(
          f'config.data.source={data_config.source!r} needs config.data.path: set it to'
          f" {what}, or use source='synthetic'.")
    return source_class(data_config.path)
  if data_config.source == 'tfds':
    if not data_config.tfds_name:
      raise ValueError(
          "config.data.source='tfds' needs config.data.tfds_name: the name of a TFDS dataset"
          " prepared with file_format='array_record' (and config.data.tfds_data_dir).")
    split_key = 'tfds_test_split' if split == 'test' else 'tfds_train_split'
    return TfdsSource(
        data_config.tfds_name,
        split=data_config[split_key],
        data_dir=data_config.tfds_data_dir,
        image_key=data_config.tfds_image_key,
        label_key=data_config.tfds_label_key,
        caption_key=data_config.tfds_caption_key,
        split_key=split_key)
  raise ValueError(
      f'Unknown data source {data_config.source!r}; config.data.source must be one'
      f' of {", ".join(repr(name) for name in SOURCE_NAMES)}.')
