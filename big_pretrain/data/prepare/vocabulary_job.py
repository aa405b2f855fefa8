"""What `python -m big_pretrain.data.text.build_vocabulary` computes, defined once for its two
ways of running: in this process (`run_in_process`), or as the Apache Beam pipeline of
vocabulary_pipeline.py, whose steps call these functions and nothing else.

A job reads contiguous ranges of the picked examples (source_texts.text_ranges):

* `VocabularyJob` (labels, tokenizer). Per range, `count` gives the token counts and the
  statistics of its examples: a label's count is the number of examples carrying the tag
  (labels.example_tags: each example's distinct tags), a word's its number of occurrences
  (tokenizer.split_words). Counts merge by adding. `add_total` and `merge_totals` fold the
  total counts into what the vocabulary needs (`Totals`: the kept tokens, chosen by
  frequent_tokens.most_frequent, and counts for the statistics), holding about 2 * max_size
  tokens at most; `finish` writes the vocabulary file, whole or not at all
  (storage.write_text), and returns the statistics the command prints. A label vocabulary
  that leaves tags out reads the examples again for one statistic, the examples it leaves
  with no label (`count_unlabelled`).
* `CaptionSample` (captions). Per range, `sample` keeps the captions with the smallest hashes
  of (example index, caption); the smallest of those are the sample, the same set and order
  whatever the ranges and workers.

In this process one range holds every example, and the counts stream through a Counter:
memory grows with the distinct tokens (or the sample size), not with the examples.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import itertools
from typing import Any, Iterable, Iterator

from big_pretrain.data.sources import source_texts
from big_pretrain.data.text import frequent_tokens
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.storage import files as storage

Text = dict[str, Any]  # {'hashtags': [...], 'caption': '...'}


@dataclasses.dataclass
class Totals:
  """What a vocabulary and its statistics need of the total counts; mergeable."""

  distinct: int = 0  # tokens counted
  candidates: int = 0  # of those, the ones a vocabulary file can hold
  kept: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (token, count)


@dataclasses.dataclass(frozen=True)
class VocabularyJob:
  """A label vocabulary ('labels') or a word tokenizer's vocabulary ('tokenizer')."""

  kind: str
  min_count: int
  max_size: int
  use_caption_words: bool = False

  def __post_init__(self):
    if self.kind not in ('labels', 'tokenizer'):
      raise ValueError(f"kind must be 'labels' or 'tokenizer', got {self.kind!r}.")

  # --- Per example, per range -------------------------------------------------------

  def example_tokens(self, text: Text) -> Iterable[str]:
    """What one example adds 1 to: its distinct tags (labels), each word occurrence (tokenizer)."""
    if self.kind == 'labels':
      return labels_lib.example_tags(text, self.use_caption_words)
    return tokenizer_lib.split_words(text['caption'])

  def count(self, texts: Iterable[Text]) -> tuple[collections.Counter, collections.Counter]:
    """(token counts, statistics) of some examples; both merge by adding."""
    counts, statistics = collections.Counter(), collections.Counter()
    labels = self.kind == 'labels'
    for text in texts:
      tokens = self.example_tokens(text)
      counts.update(tokens)
      statistics['examples'] += 1
      if labels:
        statistics['without_candidate'] += not any(map(labels_lib.is_storable, tokens))
      else:
        statistics['without_caption'] += not text['caption'].strip()
        statistics['occurrences'] += len(tokens)
    return counts, statistics

  # --- The total counts -------------------------------------------------------------

  def select(self, counts: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """The (token, count) pairs the vocabulary keeps, in id order."""
    if self.kind == 'labels':
      return labels_lib.most_frequent_labels(counts, self.min_count, self.max_size)
    return frequent_tokens.most_frequent(counts, self.min_count, self.max_size)

  def add_total(self, totals: Totals, token: str, count: int) -> Totals:
    """`totals` with one token's total count added."""
    totals.distinct += 1
    if self.kind == 'tokenizer' or labels_lib.is_storable(token):
      totals.candidates += 1
      if count >= self.min_count:
        totals.kept.append((token, count))
        if len(totals.kept) >= 2 * self.max_size + 1024:
          totals.kept = self.select(totals.kept)
    return totals

  def merge_totals(self, parts: Iterable[Totals]) -> Totals:
    """The totals of disjoint sets of tokens, together; the kept tokens selected."""
    parts = list(parts)
    return Totals(sum(part.distinct for part in parts), sum(part.candidates for part in parts),
                  self.select(itertools.chain.from_iterable(part.kept for part in parts)))

  def totals_of(self, counts: Iterable[tuple[str, int]]) -> Totals:
    totals = Totals()
    for token, count in counts:
      self.add_total(totals, token, count)
    return self.merge_totals([totals])

  # --- The statistic that needs the vocabulary ----------------------------------------

  def needs_unlabelled_count(self, totals: Totals) -> bool:
    """Whether `count_unlabelled` must read the examples again: a label vocabulary that leaves
    out some tags. (One that keeps every tag a file can hold labels every example with such
    a tag, which `count` has counted.)"""
    return self.kind == 'labels' and 0 < len(totals.kept) < totals.candidates

  def count_unlabelled(self, texts: Iterable[Text], vocabulary: labels_lib.LabelVocabulary
                       ) -> int:
    """How many of the examples have no label in `vocabulary` (WSP leaves them out)."""
    return sum(not vocabulary.encode(text['hashtags'], text['caption'], self.use_caption_words)
               for text in texts)

  # --- The file and the statistics ----------------------------------------------------

  def vocabulary(self, totals: Totals):
    """The LabelVocabulary or WordTokenizer of the kept tokens."""
    tokens = [token for token, _ in totals.kept]
    if self.kind == 'labels':
      return labels_lib.LabelVocabulary(tokens)
    return tokenizer_lib.WordTokenizer(tokens)

  def finish(self, totals: Totals, statistics: dict[str, int], unlabelled: int | None,
             output: str) -> dict[str, int]:
    """Writes the vocabulary to `output` (nothing when it is empty); returns the statistics.

    `unlabelled`: `count_unlabelled`'s sum when `needs_unlabelled_count`, else unused.
    """
    report = {'examples': statistics.get('examples', 0), 'distinct': totals.distinct,
              'size': len(totals.kept)}
    if self.kind == 'labels':
      report['unlabelled'] = (unlabelled if self.needs_unlabelled_count(totals)
                              else statistics.get('without_candidate', 0))
    else:
      occurrences = statistics.get('occurrences', 0)
      report.update(without_caption=statistics.get('without_caption', 0),
                    occurrences=occurrences,
                    unknown=occurrences - sum(count for _, count in totals.kept))
    if totals.kept:
      self.vocabulary(totals).write(output)
    return report

  # --- In this process --------------------------------------------------------------

  def run_in_process(self, reader: source_texts.TextReader, output: str) -> dict[str, int]:
    """The job over every picked example, as one range; returns the statistics."""
    every = (0, reader.num_selected())
    counts, statistics = self.count_range(reader, every)
    totals = self.totals_of(counts.items())
    del counts
    unlabelled = self.count_unlabelled_range(reader, every, totals)
    return self.finish(totals, statistics, unlabelled, output)

  # --- Per range of picks: the steps of the Beam pipeline -----------------------------

  def count_range(self, reader: source_texts.TextReader, text_range: tuple[int, int]
                  ) -> tuple[collections.Counter, collections.Counter]:
    return self.count(text for _, text in reader.read(*text_range))

  def count_unlabelled_range(self, reader: source_texts.TextReader,
                             text_range: tuple[int, int], totals: Totals) -> int | None:
    """`count_unlabelled` over the range when `needs_unlabelled_count` (else None: not read)."""
    if not self.needs_unlabelled_count(totals):
      return None
    return self.count_unlabelled((text for _, text in reader.read(*text_range)),
                                 self.vocabulary(totals))


@dataclasses.dataclass(frozen=True)
class CaptionSample:
  """`size` captions chosen by hash, one per line: the text a SentencePiece tokenizer trains on
  (sentencepiece_tokenizer.py). Newlines inside a caption become spaces; empty captions are
  left out. The chosen ones are those with the smallest `caption_hash`, written in that order,
  so the sample depends on the data only, not on how it was read."""

  size: int

  @staticmethod
  def caption_hash(index: int, caption: str) -> int:
    """A 64-bit hash of (the example's index in its source, its caption)."""
    digest = hashlib.blake2b(f'{index}\n{caption}'.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(digest, 'big')

  def sample(self, indexed_texts: Iterable[tuple[int, Text]], statistics: collections.Counter
             ) -> list[tuple[int, int, str]]:
    """The `size` smallest (hash, index, line) of the examples' non-empty captions; counts
    the examples and those without caption into `statistics`."""

    def keyed() -> Iterator[tuple[int, int, str]]:
      for index, text in indexed_texts:
        statistics['examples'] += 1
        line = ' '.join(text['caption'].splitlines()).strip()
        if not line:
          statistics['without_caption'] += 1
          continue
        yield self.caption_hash(index, text['caption']), index, line

    return heapq.nsmallest(self.size, keyed())

  def finish(self, chosen: list[tuple[int, int, str]], statistics: dict[str, int],
             output: str) -> dict[str, int]:
    """Writes the chosen captions (nothing when there are none); returns the statistics."""
    chosen = sorted(chosen)[:self.size]
    if chosen:
      storage.write_text(output, ''.join(line + '\n' for _, _, line in chosen))
    return {'examples': statistics.get('examples', 0),
            'without_caption': statistics.get('without_caption', 0), 'size': len(chosen)}

  def run_in_process(self, reader: source_texts.TextReader, output: str) -> dict[str, int]:
    """The job over every picked example, as one range; returns the statistics."""
    return self.finish(*self.sample_range(reader, (0, reader.num_selected())), output)

  def sample_range(self, reader: source_texts.TextReader, text_range: tuple[int, int]
                   ) -> tuple[list[tuple[int, int, str]], collections.Counter]:
    """(`sample` of the range, its statistics)."""
    statistics = collections.Counter()
    return self.sample(reader.read(*text_range), statistics), statistics
