"""Text tokenizers for image-text pretraining (FLIP): captions -> fixed-length int32 ids.

Two kinds, with one interface (``Tokenizer``), chosen by
``tokenizer_files.load_tokenizer`` from the file name:

* A word-level vocabulary (``WordTokenizer``, any file not ending in ``.model``),
  built from a source's captions by the command below, needs no download. A
  vocabulary for the embedded synthetic data ships with the package
  (``synthetic_tokenizer_path()``).
* A SentencePiece model you already have (``SentencePieceTokenizer`` in
  sentencepiece_tokenizer.py, a file ending in ``.model``), if the
  ``sentencepiece`` package is installed. Set
  ``config.data.text.tokenizer=/path/to/spm.model``; nothing is downloaded.
  ``build_vocabulary captions`` writes captions to train one on (sentencepiece_tokenizer.py).

Word tokenizer ids::

  0 <pad>   pads rows up to max_length
  1 <bos>   starts every text: the text tower reads its embedding at position 0
  2 <eos>   ends every text (also a truncated one, see Tokenizer.tokenize)
  3 <unk>   any word not in the vocabulary
  4...      the words, most frequent first (ties alphabetically)

Vocabulary file format (UTF-8): one token per line, the line index is the id.
The first four lines are exactly ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; every
other line is one normalized word (see ``split_words``); no blank lines.

Normalization (word tokenizer): NFKC, lowercase, then split into runs of word
characters (letters, digits, '_') and single punctuation marks, whitespace
dropped: "A red, Circle!" -> ['a', 'red', ',', 'circle', '!']. ``decode``
joins tokens with single spaces, so ``decode(encode(t)) == normalize_text(t)``
whenever every word of ``t`` is in the vocabulary.

Build a word vocabulary from a data source's captions::

  python -m big_pretrain.data.text.build_vocabulary tokenizer --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=30000 --output=tokenizer.txt

Loading either kind from its file, and recording it in a stage's folder so a checkpoint
is always evaluated with the tokenizer it was trained with: tokenizer_files.py.
"""

from __future__ import annotations

import abc
import collections
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from big_pretrain.data.text import frequent_tokens
from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = '<pad>', '<bos>', '<eos>', '<unk>'
# Their ids are their positions: the first four lines of every vocabulary file.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

# A file with this suffix is a SentencePiece model; anything else a word vocabulary.
SENTENCEPIECE_SUFFIX = '.model'

# Runs of word characters, or one punctuation mark / symbol on its own.
_WORD_OR_PUNCTUATION = re.compile(r'\w+|[^\w\s]')



def synthetic_tokenizer_path() -> str:
  """The shipped word vocabulary of every word the synthetic captions use (how it is built:
  build_vocabulary.SYNTHETIC_BUILD_FLAGS)."""
  return os.path.join(os.path.dirname(__file__), 'vocabularies',
                      'synthetic_captions_tokenizer.txt')


# --- Normalization ------------------------------------------------------------

def split_words(text: str) -> list[str]:
  """'A red, Circle!' -> ['a', 'red', ',', 'circle', '!'] (see the module docstring)."""
  return _WORD_OR_PUNCTUATION.findall(unicodedata.normalize('NFKC', text).lower())


def normalize_text(text: str) -> str:
  """The text a word tokenizer round-trips: its words and punctuation joined by single spaces."""
  return ' '.join(split_words(text))


# --- The interface ------------------------------------------------------------

class Tokenizer(abc.ABC):
  """Text <-> ids, and fixed-length int32 rows for the text tower."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Ids lie in [0, vocab_size)."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Fills rows past the end of the text."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """Starts every encoded text; None if the tokenizer has none."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int | None:
    """Ends every encoded text; None if the tokenizer has none."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """[bos] + the text's ids + [eos], not padded or truncated."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, without <pad>, <bos> and <eos>."""

  def tokenize(self, text: str, max_length: int) -> np.ndarray:
    """int32 (max_length,): ``encode(text)`` padded with pad_id, or truncated.

    A text too long keeps its first ``max_length - 1`` ids (so <bos> stays at
    position 0) and ends with <eos> in the last position: every row then has
    exactly one <bos> and one <eos>, and a tower that reads either still finds it.
    """
    _check_max_length(max_length)
    ids = self.encode(text)
    if len(ids) > max_length:
      ids = ids[:max_length]
      if self.eos_id is not None:
        ids[-1] = self.eos_id
    row = np.full((max_length,), self.pad_id, np.int32)
    row[:len(ids)] = ids
    return row

  def tokenize_batch(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """int32 (len(texts), max_length): one ``tokenize`` row per text."""
    _check_max_length(max_length)
    if isinstance(texts, str):
      raise TypeError('tokenize_batch takes a sequence of texts; for one text use tokenize.')
    rows = [self.tokenize(text, max_length) for text in texts]
    return np.stack(rows) if rows else np.zeros((0, max_length), np.int32)


def _check_max_length(max_length: int) -> None:
  if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or (
      max_length < 2):
    raise ValueError(
        f'max_length={max_length!r} must be an integer of at least 2, room for <bos> and'
        ' <eos> (config.data.text.max_length; 32 in FLIP).')


# --- Word tokenizer -----------------------------------------------------------

class WordTokenizer(Tokenizer):
  """A fixed word vocabulary; see the module docstring for ids and normalization.

  Args:
    words: the words, in id order from 4 (the special tokens come first and
      are not listed). Each must be one normalized token.
    locations: where each word was defined (e.g. "line 7 of tokenizer.txt"),
      used in error messages; defaults to "words[i]".

  Raises:
    ValueError: a word is a special token, not a single normalized token, or
      given twice; the message names where.
  """

  # Every word vocabulary has the same special ids: the first four lines of its file.
  pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

  def __init__(self, words: Sequence[str], *, locations: Sequence[str] | None = None):
    words = list(words)
    if locations is None:
      locations = [f'words[{index}]' for index in range(len(words))]
    if len(locations) != len(words):
      raise ValueError(f'Got {len(locations)} locations for {len(words)} words.')
    self._tokens = list(SPECIAL_TOKENS)
    self._ids = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    defined_at = {}
    for word, location in zip(words, locations):
      if word in SPECIAL_TOKENS:
        raise ValueError(
            f'{location}: {word!r} is a special token; they take ids 0-3 and are never'
            ' listed among the words.')
      if split_words(word) != [word]:
        raise ValueError(
            f'{location}: {word!r} is not one normalized token (it splits into'
            f' {split_words(word)}), so no text would ever produce it. Write lowercase'
            ' words or single punctuation marks, one per line.')
      if word in defined_at:
        raise ValueError(
            f'{location}: {word!r} is already listed at {defined_at[word]}. Remove one:'
            ' ids are line positions, so a duplicate would shadow an id.')
      defined_at[word] = location
      self._ids[word] = len(self._tokens)
      self._tokens.append(word)

  @classmethod
  def from_file(cls, path: str) -> WordTokenizer:
    """Reads a vocabulary file (format in the module docstring)."""
    try:
      # -sig: tolerate a byte order mark. epath: the file may be in a bucket (a workdir's copy).
      lines = epath.Path(path).read_bytes().decode('utf-8-sig').splitlines()
    except FileNotFoundError:
      raise FileNotFoundError(
          f'Tokenizer file {path!r} does not exist. Build one from your captions with'
          ' `python -m big_pretrain.data.text.build_vocabulary tokenizer --source=image_folder'
          f' --path=DATA_DIR --output={path}` (or --source=synthetic), or use the shipped'
          ' synthetic one, big_pretrain.data.text.tokenizer.synthetic_tokenizer_path().'
      ) from None
    except UnicodeDecodeError as error:
      raise DamagedFileError(
          f'Tokenizer file {path!r} is not UTF-8 ({error}); save it as UTF-8, or give a'
          f' SentencePiece model a name ending in {SENTENCEPIECE_SUFFIX!r}.') from None
    header = lines[:len(SPECIAL_TOKENS)]
    if header != list(SPECIAL_TOKENS):
      raise DamagedFileError(
          f'Tokenizer file {path!r} starts with {header}, but a word vocabulary starts with'
          f' the lines {list(SPECIAL_TOKENS)} (ids 0-3). Rebuild it with `python -m'
          ' big_pretrain.data.text.build_vocabulary tokenizer ... --output=PATH`; a'
          ' SentencePiece model'
          f' needs a name ending in {SENTENCEPIECE_SUFFIX!r}.')
    words = lines[len(SPECIAL_TOKENS):]
    for line_number, word in enumerate(words, start=len(SPECIAL_TOKENS) + 1):
      if not word.strip():
        raise DamagedFileError(
            f'Line {line_number} of tokenizer file {path!r} is blank. Remove it: ids are'
            ' line positions, so a blank line would shift every later id.')
    locations = [f'line {number} of {path}'
                 for number in range(len(SPECIAL_TOKENS) + 1, len(lines) + 1)]
    try:
      return cls(words, locations=locations)
    except ValueError as error:  # a word given twice, located by its line
      raise DamagedFileError(str(error)) from None

  def write(self, path: str) -> None:
    """Writes the vocabulary file, one token per line in id order."""
    storage.write_text(path, ''.join(token + '\n' for token in self._tokens))  # whole or not at all

  @property
  def tokens(self) -> list[str]:
    """Every token; the token with id i is tokens[i]."""
    return list(self._tokens)

  @property
  def words(self) -> list[str]:
    """The tokens after the special ones."""
    return self._tokens[len(SPECIAL_TOKENS):]

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)


  def token_id(self, word: str) -> int:
    """The id of one normalized token, or UNK_ID."""
    return self._ids.get(word, UNK_ID)

  def encode(self, text: str) -> list[int]:
    return [BOS_ID, *(self.token_id(word) for word in split_words(text)), EOS_ID]

  def decode(self, ids: Iterable[int]) -> str:
    """Tokens joined by spaces; <pad>, <bos>, <eos> dropped, an unknown word shown as <unk>."""
    tokens = []
    for token_id in ids:
      token_id = int(token_id)
      if not 0 <= token_id < len(self._tokens):
        raise ValueError(
            f'Token id {token_id} is outside this vocabulary of {len(self._tokens)} tokens:'
            ' the ids come from a different tokenizer.')
      if token_id not in (PAD_ID, BOS_ID, EOS_ID):
        tokens.append(self._tokens[token_id])
    return ' '.join(tokens)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, WordTokenizer):
      return NotImplemented
    return self._tokens == other._tokens

  def __repr__(self) -> str:
    preview = ', '.join(self.words[:5]) + (', ...' if len(self.words) > 5 else '')
    return f'WordTokenizer({self.vocab_size} tokens: {preview})'


def build_tokenizer(captions: Iterable[str], min_count: int, max_size: int) -> WordTokenizer:
  """The most frequent normalized words of `captions`, most frequent first.

  A word's count is its number of occurrences. Keeps words seen at least
  `min_count` times, at most `max_size` of them (besides the 4 special
  tokens); ties are broken alphabetically, so the result is deterministic.
  (The command, in a process or on Beam, counts with data/prepare/vocabulary_job.py,
  through the same `split_words` and frequent_tokens.most_frequent.)
  """
  counts = collections.Counter()
  for caption in captions:
    counts.update(split_words(caption))
  return WordTokenizer(
      [word for word, _ in frequent_tokens.most_frequent(counts.items(), min_count, max_size)])
