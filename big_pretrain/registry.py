"""One named table per extension point: objectives, evaluators, data sources, weight formats,
accelerators, jobs.

Each entry carries its own name (`entry.name`, or what `name_of` reads); the table is
written once, in the extension point's __init__.py or module, as a list of entries:
adding one is its module and one line in that list. Everything else in the package asks
the table (`names()`, `registry[name]`, iteration) and never names an entry itself, so
tests parametrised over a table cover a new entry by its being registered.

`registered(entry)` adds an entry for the length of a `with` block: how a test shows that
an entry written outside the package is picked up by everything that reads the table;
`replaced(entry)` stands a variant in for a registered one (a smaller chip, say).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

Entry = TypeVar('Entry')


class Registry(Generic[Entry]):
  """Entries of one extension point, by name, in the order registered."""

  def __init__(self, kind: str, entries: Iterable[Entry] = (),
               name_of: Callable[[Entry], str] = lambda entry: entry.name):
    self.kind = kind  # how an error message names an entry: 'data source', 'weight format'
    self._name_of = name_of
    self._entries: dict[str, Entry] = {}
    for entry in entries:
      self.register(entry)

  def register(self, entry: Entry) -> Entry:
    """Adds `entry` under its name (refused if the name is taken); returns it."""
    name = self._name_of(entry)
    if not name or not isinstance(name, str):
      raise ValueError(f'A {self.kind} needs a name; {entry!r} has {name!r}.')
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is registered twice: {self._entries[name]!r} '
                       f'and {entry!r}.')
    self._entries[name] = entry
    return entry

  @contextlib.contextmanager
  def registered(self, entry: Entry) -> Iterator[Entry]:
    """`entry` in the table for the `with` block only."""
    name = self._name_of(self.register(entry))
    try:
      yield entry
    finally:
      del self._entries[name]

  @contextlib.contextmanager
  def replaced(self, entry: Entry) -> Iterator[Entry]:
    """`entry` in place of the registered entry of its name, for the `with` block only."""
    name = self._name_of(entry)
    original = self[name]
    self._entries[name] = entry
    try:
      yield entry
    finally:
      self._entries[name] = original

  def names(self) -> list[str]:
    """Every name, sorted."""
    return sorted(self._entries)

  def __getitem__(self, name: str) -> Entry:
    if name not in self._entries:
      raise ValueError(f'Unknown {self.kind} {name!r}; choose one of {self.names()}.')
    return self._entries[name]

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[Entry]:
    return iter(list(self._entries.values()))

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'Registry({self.kind!r}: {", ".join(self._entries)})'
