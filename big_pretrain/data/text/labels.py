"""The label vocabulary of weakly-supervised pretraining (WSP).

WSP labels an image with the hashtags of its text (optionally every word of
its caption), mapped to a fixed vocabulary; the targets are multi-hot and an
example with no label in the vocabulary is left out of the loss.

Tags are compared after normalization (``normalize_tag``): surrounding
whitespace and one leading '#' are removed, the tag is lowercased, and
punctuation at both ends is stripped, so '#Circle', 'circle' and 'Circle!'
are the same tag.

Vocabulary file format (UTF-8, one label per line)::

  # Shapes first. This line is a comment.
  circle: round, disc
  square

  triangle: #trigon

* Label ids are the indices of the label lines, counting from 0; comment and
  blank lines do not count. Files written by ``LabelVocabulary.write`` have no
  comments or blank lines, so there the line index is the label id.
* ``label: tag1, tag2`` maps the hashtags ``tag1`` and ``tag2`` to ``label``
  (synonyms are comma-separated, a '#' before them is optional). A label always
  maps to itself.
* Labels and synonyms are normalized when read, so they can never contain ':'
  or ',' (the separators) nor start with '#'.
* A blank line, or a line whose first non-space character is '#' followed by a
  space, a tab or the end of the line, is a comment. '#circle' (no space) is the
  label 'circle' written as a hashtag, not a comment.
* A label given twice, or a hashtag mapped to two labels, is an error that
  names both lines.

Build a vocabulary from a data source's hashtags::

  python -m big_pretrain.data.text.build_vocabulary labels --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=30000 --output=vocab.txt

Labels are ordered by how many examples carry them (most frequent first, ties
alphabetically), so low ids are the common labels.
"""

from __future__ import annotations

import collections
import os
import re
import string
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from big_pretrain import schema
from big_pretrain.data.text import frequent_tokens
from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage

# Pads the 'label_ids' rows the pipeline sends to the device; never a label id.
PADDING_LABEL_ID = -1

# A caption's hashtags: '#' and a run of word characters.
_HASHTAG = re.compile(r'#\w+')

# The format's separators: a tag containing one cannot be written to a file.
_SEPARATORS = (':', ',', '\n', '\r')


def synthetic_vocabulary_path() -> str:
  """The shipped vocabulary of every hashtag the synthetic source emits (how it is built:
  build_vocabulary.SYNTHETIC_BUILD_FLAGS)."""
  return os.path.join(os.path.dirname(__file__), 'vocabularies', 'synthetic_shapes.txt')


# --- Normalization ------------------------------------------------------------

def _is_punctuation_or_space(character: str) -> bool:
  # Unicode punctuation too ('…', '“'), plus ASCII symbols such as '$' or '+'.
  return (character in string.punctuation or character.isspace()
          or unicodedata.category(character).startswith('P'))


def normalize_tag(tag: str) -> str:
  """'#Circle!' -> 'circle': strips one leading '#', lowercases, strips punctuation at the ends.

  Returns '' for a tag with nothing but punctuation; '' is never a label.
  """
  tag = tag.strip()
  if tag.startswith('#'):
    tag = tag[1:]
  tag = tag.lower()
  start, end = 0, len(tag)
  while start < end and _is_punctuation_or_space(tag[start]):
    start += 1
  while end > start and _is_punctuation_or_space(tag[end - 1]):
    end -= 1
  return tag[start:end]


def caption_hashtags(caption: str) -> list[str]:
  """The '#word's of a caption, in order: the 'hashtags' of the sources that read captions."""
  return _HASHTAG.findall(caption)


def _candidate_tags(hashtags: Iterable[str], caption: str, use_caption_words: bool) -> set[str]:
  """The distinct non-empty normalized tags of one example's text."""
  texts = list(hashtags)
  if use_caption_words:
    texts.extend(caption.split())
  return {tag for tag in map(normalize_tag, texts) if tag}


def example_tags(example: Mapping[str, Any], use_caption_words: bool = False) -> set[str]:
  """The distinct normalized tags of a source example ('hashtags', and 'caption' words if asked)."""
  return _candidate_tags(example.get('hashtags') or (), example.get('caption') or '',
                         use_caption_words)


def is_storable(tag: str) -> bool:
  """Whether a vocabulary file can hold the tag: it has none of the format's separators."""
  return not any(separator in tag for separator in _SEPARATORS)


# --- The vocabulary -----------------------------------------------------------

class LabelVocabulary:
  """Maps normalized hashtags (labels and their synonyms) to label ids.

  Args:
    labels: the label names; label ``i`` has id ``i``. Names are normalized.
    synonyms: label name -> hashtags that also map to that label.
    locations: where each label was defined (e.g. "line 3 of vocab.txt"),
      used in error messages; defaults to "labels[i]".

  Raises:
    ValueError: a label is empty after normalization, contains ':' or ',', is
      given twice, or a hashtag maps to two labels; the message names where.
  """

  def __init__(self, labels: Sequence[str],
               synonyms: Mapping[str, Iterable[str]] | None = None,
               *, locations: Sequence[str] | None = None):
    labels = list(labels)
    synonyms = dict(synonyms or {})
    if locations is None:
      locations = [f'labels[{index}]' for index in range(len(labels))]
    if len(locations) != len(labels):
      raise ValueError(f'Got {len(locations)} locations for {len(labels)} labels.')
    unknown = sorted(set(synonyms) - set(labels))
    if unknown:
      raise ValueError(
          f'Synonyms are given for {unknown}, which are not among the labels;'
          ' key synonyms by the label name exactly as it appears in `labels`.')

    self._labels: list[str] = []
    self._synonyms: dict[str, tuple[str, ...]] = {}
    self._ids: dict[str, int] = {}
    # Where each tag was defined, for naming both sides of a conflict.
    defined_at: dict[str, str] = {}
    for label_id, (raw_label, location) in enumerate(zip(labels, locations)):
      label = self._checked_name(raw_label, 'label', location)
      if label in self._ids:
        other = self._labels[self._ids[label]]
        if other == label:
          raise ValueError(
              f'{location}: label {label!r} is already defined at {defined_at[label]}.'
              ' Remove one of them; list other spellings as synonyms ("label: tag1, tag2").')
        raise ValueError(
            f'{location}: label {label!r} is already a synonym of {other!r}'
            f' ({defined_at[label]}). A hashtag can map to one label only: remove it'
            ' from one of the two lines.')
      self._labels.append(label)
      self._ids[label] = label_id
      defined_at[label] = location

      label_synonyms = []
      for raw_synonym in synonyms.get(raw_label, ()):
        synonym = self._checked_name(raw_synonym, f'synonym of {label!r}', location)
        if synonym == label or synonym in label_synonyms:
          continue  # Repeating a tag of the same label is harmless.
        if synonym in self._ids:
          other = self._labels[self._ids[synonym]]
          raise ValueError(
              f'{location}: synonym {synonym!r} of {label!r} already maps to label'
              f' {other!r} ({defined_at[synonym]}). A hashtag can map to one label only:'
              ' remove it from one of the two lines.')
        label_synonyms.append(synonym)
        self._ids[synonym] = label_id
        defined_at[synonym] = location
      if label_synonyms:
        self._synonyms[label] = tuple(label_synonyms)

  @staticmethod
  def _checked_name(raw: str, role: str, location: str) -> str:
    name = normalize_tag(raw)
    if not name:
      raise ValueError(
          f'{location}: {role} {raw!r} is empty once normalized (a leading "#",'
          ' case and punctuation at the ends are stripped); give it letters or digits.')
    if not is_storable(name):
      raise ValueError(
          f'{location}: {role} {name!r} contains one of {_SEPARATORS}, which separate'
          ' labels and synonyms in vocabulary files; remove that character.')
    return name

  @classmethod
  def from_file(cls, path: str) -> LabelVocabulary:
    """Reads a vocabulary file (format in the module docstring)."""
    try:
      with open(path, encoding='utf-8-sig') as file:  # -sig: tolerate a byte order mark.
        lines = file.read().splitlines()
    except FileNotFoundError:
      raise FileNotFoundError(
          f'Label vocabulary file {path!r} does not exist. Build one from your data with'
          f' `python -m big_pretrain.data.text.build_vocabulary labels --source=image_folder'
          f' --path=DATA_DIR --output={path}` (or --source=synthetic), or use the'
          ' shipped synthetic one, big_pretrain.data.text.labels.synthetic_vocabulary_path().'
      ) from None
    except UnicodeDecodeError as error:
      raise DamagedFileError(
          f'Label vocabulary file {path!r} is not UTF-8 ({error}); save it as UTF-8.') from None

    labels, synonyms, locations = [], {}, []
    for line_number, line in enumerate(lines, start=1):
      text = line.strip()
      if not text or _is_comment(text):
        continue
      label, _, synonyms_text = text.partition(':')
      labels.append(label)
      # Empty entries (a trailing comma) are ignored.
      synonyms[label] = [s for s in synonyms_text.split(',') if s.strip()]
      locations.append(f'line {line_number} of {path}')
    if not labels:
      raise DamagedFileError(
          f'Label vocabulary file {path!r} has no labels (only blank or comment lines).'
          ' Rebuild it with `python -m big_pretrain.data.text.build_vocabulary labels ...'
          ' --output=PATH`.')
    if len(set(labels)) != len(labels):
      # The same raw text twice: the synonyms dict keeps one; report the duplicate line.
      first_line = {}
      for label, location in zip(labels, locations):
        if label in first_line:
          raise DamagedFileError(
              f'{location}: label {normalize_tag(label)!r} is already defined at'
              f' {first_line[label]}. Remove one of them; list other spellings as'
              ' synonyms ("label: tag1, tag2").')
        first_line[label] = location
    try:
      return cls(labels, synonyms, locations=locations)
    except ValueError as error:  # a name that cannot be stored, or a synonym given twice
      raise DamagedFileError(str(error)) from None

  def write(self, path: str) -> None:
    """Writes the vocabulary in the file format, one label per line in id order."""
    lines = [label + (': ' + ', '.join(self._synonyms[label]) if label in self._synonyms else '')
             for label in self._labels]
    storage.write_text(path, ''.join(line + '\n' for line in lines))  # whole or not at all

  @property
  def labels(self) -> list[str]:
    """The label names; the label with id i is labels[i]."""
    return list(self._labels)

  @property
  def synonyms(self) -> dict[str, tuple[str, ...]]:
    """Label name -> the other hashtags mapped to it (labels without synonyms are left out)."""
    return dict(self._synonyms)

  def __len__(self) -> int:
    return len(self._labels)

  def label_id(self, tag: str) -> int | None:
    """The id of the label `tag` (a label or a synonym, normalized first) maps to, or None."""
    return self._ids.get(normalize_tag(tag))

  def encode(self, hashtags: Iterable[str], caption: str = '',
             use_caption_words: bool = False) -> list[int]:
    """Sorted, distinct ids of the known labels among `hashtags` (and the caption's words if asked)."""
    tags = _candidate_tags(hashtags, caption, use_caption_words)
    return sorted({self._ids[tag] for tag in tags if tag in self._ids})

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, LabelVocabulary):
      return NotImplemented
    return self._labels == other._labels and self._synonyms == other._synonyms

  def __repr__(self) -> str:
    preview = ', '.join(self._labels[:5]) + (', ...' if len(self._labels) > 5 else '')
    return f'LabelVocabulary({len(self)} labels: {preview})'


def _is_comment(stripped_line: str) -> bool:
  # '# note' and '#' are comments; '#circle' is a label written as a hashtag.
  return stripped_line.startswith('#') and (len(stripped_line) == 1 or stripped_line[1].isspace())


def pad_label_ids(label_ids: Sequence[int], length: int) -> np.ndarray:
  """int32 (length,): the sorted ids, padded with PADDING_LABEL_ID, keeping the lowest ids if too many.

  Labels are numbered most frequent first, so truncation keeps the common labels.
  """
  row = np.full((length,), PADDING_LABEL_ID, np.int32)
  kept = sorted(label_ids)[:length]
  row[:len(kept)] = kept
  return row


def build_vocabulary(examples: Iterable[Mapping[str, Any]], min_count: int, max_size: int,
                     use_caption_words: bool = False) -> LabelVocabulary:
  """The most common normalized tags of `examples`, most frequent first.

  A tag's count is the number of examples carrying it (a tag repeated in one
  caption counts once). Keeps tags seen in at least `min_count` examples, at
  most `max_size` of them; ties are broken alphabetically, so the result is
  deterministic. Tags containing ':' or ',' (e.g. URLs among caption words)
  cannot be written to a vocabulary file and are never kept. (The command, in a
  process or on Beam, counts with data/prepare/vocabulary_job.py, through the
  same `example_tags` and `most_frequent_labels`.)
  """
  counts = collections.Counter()
  for example in examples:
    counts.update(example_tags(example, use_caption_words))
  return LabelVocabulary(
      [tag for tag, _ in most_frequent_labels(counts.items(), min_count, max_size)])


def most_frequent_labels(tag_counts: Iterable[tuple[str, int]], min_count: int,
                         max_size: int) -> list[tuple[str, int]]:
  """The (tag, count) pairs a vocabulary keeps, in label id order, of (tag, number of examples
  carrying it) pairs: frequent_tokens.most_frequent among the tags a file can hold."""
  return frequent_tokens.most_frequent(tag_counts, min_count, max_size, keep=is_storable)


# --- The vocabulary a data config names -----------------------------------------

# config.data.labels: WSP's labels, hashtags mapped to a fixed vocabulary.
DATA_KEYS = schema.Group(
    "WSP's labels: each image's hashtags mapped to a fixed vocabulary ('label_ids')",
    vocabulary=schema.Key(None, schema.OPTIONAL_TEXT,
                          'a label vocabulary file; None: no labels (no label_ids in batches)',
                          type=str),
    max_labels_per_example=schema.Key(16, schema.COUNT,
                                      "the width of the 'label_ids' rows; an example with "
                                      'more labels keeps the lowest ids'),
    use_caption_words=schema.Key(False, schema.BOOLEAN,
                                 'also map every caption word, not only hashtags'),
)


def configured_vocabulary_path(data_config) -> str | None:
  """config.data.labels.vocabulary, or None when WSP labels are off."""
  return data_config.labels.vocabulary
