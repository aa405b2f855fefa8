"""How a config key is declared: its default, the values it may take and what it means, together.

Each key is declared once, by the module that reads it (an objective its `config.objective`
keys, an evaluator its own, the ViT `config.model`, a data source its `config.data` keys, ...):

  KEYS = Group(
      mask_ratio=Key(0.75, UNIT_FRACTION, 'the fraction of patches hidden from the encoder'),
      decoder=Group(width=Key(512, COUNT, "the decoder's width")),
  )

`KEYS.defaults()` is the ConfigDict that config files start from (so every key exists and can
be set on the command line); `KEYS.rules()` is what validation checks each value against,
once, before anything compiles; the meaning is shown beside a refused value. Code past
validation reads the keys directly and trusts their values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
from typing import Any, Callable, Iterator

import ml_collections

from big_pretrain.registry import Registry


@dataclasses.dataclass(frozen=True)
class Rule:
  """`accepts(value)`, and what it accepts in words, for the error: `words`, or a function
  that gives them when asked, for choices registered after the rule is declared
  (`registered_in`)."""
  accepts: Callable[[Any], bool]
  words: str | Callable[[], str]

  @property
  def allowed(self) -> str:
    return self.words() if callable(self.words) else self.words

  def refuses(self, value) -> bool:
    try:
      return not self.accepts(value)
    except (TypeError, ValueError):  # e.g. a number where a pair belongs
      return True


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its default, its rule, and a one-line meaning.

  `type`: the key's value is an ml_collections FieldReference of this type, for a default
  of None (a placeholder that still knows its type) or a key that takes values of several
  types (`object`: checked by its rule alone).

  `names_stage`: the key names an earlier stage of a chain, of this kind ('training', or a
  job's name such as 'pseudo_label'); the chain checks it. `path_key`: the sibling key that
  names the same thing by its path, for a config without stages (setting both is refused);
  with `chain_fills_path`, the chain puts the named stage's folder there before the stage
  runs.
  """
  default: Any
  rule: Rule
  meaning: str
  type: type | None = None
  names_stage: str | None = None
  path_key: str | None = None
  chain_fills_path: bool = False

  def default_value(self):
    if self.type is None:
      return self.default
    return ml_collections.FieldReference(self.default, field_type=self.type)


@dataclasses.dataclass(frozen=True)
class FreeForm:
  """A group whose keys the user names (evaluators by name, sharding rule overrides, an
  evaluator's overrides of config.data): its contents are checked where it is used, not
  against a fixed list of keys. `default`: what it holds unless set."""
  meaning: str
  default: tuple[tuple[str, Any], ...] = ()


class Group(collections.abc.Mapping):
  """name -> Key, Group or FreeForm: a group of config keys (read-only)."""

  def __init__(self, meaning: str = '', **declared):
    for name, value in declared.items():
      if not isinstance(value, (Key, Group, FreeForm)):
        raise TypeError(f'{name}: declare a Key, Group or FreeForm, not {value!r}.')
    self._declared = types.MappingProxyType(dict(declared))
    self.meaning = meaning

  def __getitem__(self, name: str):
    return self._declared[name]

  def __iter__(self):
    return iter(self._declared)

  def __len__(self) -> int:
    return len(self._declared)

  def defaults(self) -> ml_collections.ConfigDict:
    """Every key at its default."""
    config = ml_collections.ConfigDict()
    for name, declared in self.items():
      if isinstance(declared, Key):
        config[name] = declared.default_value()
      elif isinstance(declared, Group):
        config[name] = declared.defaults()
      else:
        config[name] = ml_collections.ConfigDict(dict(declared.default))
    return config

  def walk(self, prefix: str = '') -> Iterator[tuple[str, Key | FreeForm]]:
    """(dotted name, Key or FreeForm) of every key, depth first."""
    for name, declared in self.items():
      if isinstance(declared, Group):
        yield from declared.walk(f'{prefix}{name}.')
      else:
        yield f'{prefix}{name}', declared

  def find(self, dotted: str) -> Key | FreeForm | None:
    node = self
    for part in dotted.split('.'):
      if not isinstance(node, Group) or part not in node:
        return None
      node = node[part]
    return None if isinstance(node, Group) else node

  def with_keys(self, meaning: str | None = None, **declared) -> Group:
    """This group with more keys, or some declared anew (another default, say)."""
    return Group(self.meaning if meaning is None else meaning, **{**self, **declared})


class GatheredGroup(Group):
  """A group whose keys are gathered each time it is read, from `gather()`: groups whose keys
  it holds side by side (data sources' own keys of config.data, one group per registered
  source). A source registered after the group is declared has its keys in every config
  built, and validated, from then on. A key that two of the groups declare is refused."""

  def __init__(self, meaning: str, gather: Callable[[], collections.abc.Iterable[Group]]):
    super().__init__(meaning)
    self._gather = gather

  def _gathered(self) -> dict[str, Key | Group | FreeForm]:
    declared, declared_by = {}, {}
    for group in self._gather():
      for name, value in group.items():
        if name in declared:
          raise ValueError(
              f'Config key {name!r} of {self.meaning!r} is declared twice: by '
              f'{declared_by[name]!r} and by {group.meaning!r}. Rename one of them.')
        declared[name], declared_by[name] = value, group.meaning
    return declared

  def __getitem__(self, name: str):
    return self._gathered()[name]

  def __iter__(self):
    return iter(self._gathered())

  def __len__(self) -> int:
    return len(self._gathered())

  def items(self):  # gathered once, not once per key
    return self._gathered().items()

  def keys(self):
    return self._gathered().keys()

  def values(self):
    return self._gathered().values()


def value_error(path: str, value, key: Key) -> str:
  """'config.optim.b2=1.5: must lie in [0, 1) (Adam's second-moment decay).'"""
  return f'{path}={value!r}: {key.rule.allowed} ({key.meaning}).'


# --- Rules -----------------------------------------------------------------------

def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def at_least(low, *, integer: bool = False, or_none: bool = False) -> Rule:
  kind = 'an integer' if integer else 'a number'
  return Rule(lambda v: (or_none and v is None) or (
      (_integer(v) if integer else _number(v)) and v >= low),
              f'must be {kind} >= {low}' + (' (or None)' if or_none else ''))


def above(low, *, or_none: bool = False) -> Rule:
  return Rule(lambda v: (or_none and v is None) or (_number(v) and v > low),
              f'must be a number > {low}' + (' (or None)' if or_none else ''))


def within(low, high, *, low_open=False, high_open=False, or_none=False) -> Rule:
  def accepts(v):
    if or_none and v is None:
      return True
    return (_number(v) and math.isfinite(v) and (low < v if low_open else low <= v)
            and (v < high if high_open else v <= high))
  interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  return Rule(accepts, f'must lie in {interval}' + (' (or None)' if or_none else ''))


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, f'choose one of {choices}')


def registered_in(registry: Registry) -> Rule:
  """A name in `registry` when the value is checked, so an entry registered after the key is
  declared (a test's, say) is accepted; the words list the names registered then."""
  return Rule(lambda v: isinstance(v, str) and v in registry,
              lambda: f'choose one of {tuple(registry.names())}')


def text(*, or_none: bool = True) -> Rule:
  return Rule(lambda v: isinstance(v, str) or (or_none and v is None),
              'must be a string' + (' (or None)' if or_none else ''))


def texts() -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
              'must be a tuple of strings')


def ordered_pair(low: float, high: float | None, *, low_open: bool = True) -> Rule:
  """(min, max) with low < min <= max [<= high]."""
  def accepts(v):
    return (len(v) == 2 and all(_number(x) for x in v)
            and (low < v[0] if low_open else low <= v[0]) and v[0] <= v[1]
            and (high is None or v[1] <= high))
  bound = f' <= {high}' if high is not None else ''
  return Rule(accepts, f'must be (min, max) with {low} {"<" if low_open else "<="} min <= max'
                       f'{bound}')


BOOLEAN = Rule(lambda v: isinstance(v, bool), 'must be True or False')
COUNT = at_least(1, integer=True)  # a size, a number of steps or of things
NON_NEGATIVE_COUNT = at_least(0, integer=True)
UNIT_FRACTION = within(0, 1, high_open=True)  # a probability or a ratio below 1
OPTIONAL_TEXT, REQUIRED_TEXT = text(), text(or_none=False)
POSITIVE_INTEGERS = Rule(lambda v: len(v) > 0 and all(_integer(x) and x >= 1 for x in v),
                         'must be a non-empty tuple of integers >= 1')
