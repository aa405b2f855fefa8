"""What every data source provides (the contract: `Source`), and what a second source mixed
into the training batches provides (`SecondSource`).

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

from typing import Any, Callable, Protocol

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
