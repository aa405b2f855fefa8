"""What every data source provides (the contract: `Source`), what a source that
config.data.source names declares besides (`RegisteredSource`), and what a second source
mixed into the training batches provides (`SecondSource`).

The Source contract:

* ``len(source)``: the number of examples.
* ``source[i]`` for ``0 <= i < len(source)``: an example, a dict with
    'key'       str: names the example, the same in every run (in warnings, and
                to join pseudo-labels to images: `example_key`);
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
* Errors: a missing or empty path raises when the source is built
  (FileNotFoundError or ValueError, naming the config key and the fix), so a run
  stops before anything is compiled; config validation has checked every setting.
  ``__getitem__`` does not decode the image, so a damaged image never raises there
  (the input skips it); a damaged record does (ValueError, naming where it is).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Protocol

from big_pretrain import schema
from big_pretrain.errors import ConfigError

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


class RegisteredSource(abc.ABC):
  """A source that config.data.source names: the class of a module sources/<name>.py, listed
  in SOURCES (sources/__init__.py), the only place that lists sources. Beside the Source
  contract, it declares:

    name: config.data.source's value for it, e.g. 'image_folder'.
    data_keys: a schema.Group of its own keys of config.data, each with its default, rule and
      meaning (an empty Group when it has none). They sit flat in config.data, beside the
      keys every source shares (source, path, test_path, split), so their names carry the
      source's ('tfds_name'); sources/__init__.py says why they are not a group of their own.
    path_holds: what config.data.path (and test_path, the held-out split) must hold, for a
      source that reads them; None for one that reads neither.
    check_config(data, path) (class method, optional): the checks across config.data's keys
      that the source needs beside each key's rule, before any compute; raise ConfigError
      naming `{path}.data.<key>` and the fix.
    check_has_data(location) (class method, optional): raise FileNotFoundError or ValueError,
      saying why, when a local config.data.path or test_path holds no data. Cheap (stop at
      the first image found): it runs in config validation, before any compile.
    from_config(data, split) (class method): the source of config.data's `split` (SPLITS).

  A source built from config.data.path alone subclasses PathSource, below: it gives
  check_config (the path is set) and from_config.
  """

  name: str = ''
  data_keys: schema.Group = schema.Group()
  path_holds: str | None = None

  @classmethod
  def check_config(cls, data, path: str) -> None:
    """The source's checks across config.data's keys (raise ConfigError)."""

  @classmethod
  def check_has_data(cls, location: str) -> None:
    """Raises FileNotFoundError or ValueError when a local `location` holds no data."""

  @classmethod
  @abc.abstractmethod
  def from_config(cls, data, split: str) -> Source:
    """The source of config.data's `split`, 'train' or 'test'."""


class PathSource(RegisteredSource):
  """A source of the files at config.data.path (test_path for the held-out split), built from
  that path alone: an image folder, the converter's shards. Declares `path_holds` and
  `path_hint`, what the error says to do when config.data.path is unset."""

  path_hint: str = ''

  @classmethod
  def check_config(cls, data, path: str) -> None:
    if not data.path:
      raise ConfigError(f'{path}.data.path is not set, and {path}.data.source={cls.name!r} '
                        f'needs it. {cls.path_hint}')

  @classmethod
  def from_config(cls, data, split: str) -> Source:
    return cls(data.test_path if split == 'test' else data.path)


class SecondSource(Protocol):
  """Examples mixed into every training batch beside config.data's own, at exactly
  `fraction` of each global batch (Grain's deterministic mix): a self-training student's
  pseudo-labelled images (sources/pseudo_labelled.py). Every row of a mixed batch carries
  the device features of `feature_shapes`, so the objective can tell the two apart."""

  config_key: str                # the group of config.data that configures it
  fraction: float

  @property
  def feature_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
    """name -> (per-example shape, dtype) of the features every row of a mixed batch gets."""

  def build(self, main_source: Source, build_source: Callable) -> Source:
    """Its examples; `build_source(data_config)` builds any source it reads from."""

  def as_main_row(self, example: dict[str, Any]) -> dict[str, Any]:
    """An example of the main source, with the features at their values for such a row."""

  def as_mixed_row(self, example: dict[str, Any]) -> dict[str, Any]:
    """One of its examples, with the features at their values for such a row."""


def example_key(example: dict[str, Any], index: int) -> str:
  """What names an example in every run: the source's key, or its index if it has none."""
  return str(example.get('key') or index)
