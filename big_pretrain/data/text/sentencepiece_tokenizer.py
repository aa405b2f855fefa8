"""A SentencePiece model as a `Tokenizer` (config.data.text.tokenizer=/path/to/spm.model).

Optional: needs the ``sentencepiece`` package, imported only when a ``.model``
file is loaded; nothing is downloaded.

Train one on a fixed sample of a source's captions, one per line (the same sample
whether the command runs in a process or on Beam, data/prepare/vocabulary_job.py)::

  python -m big_pretrain.data.text.build_vocabulary captions --source=image_folder \\
      --path=/data/images --sample_size=1000000 --output=captions.txt
  spm_train --input=captions.txt --model_prefix=spm --vocab_size=32000 \\
      --pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3

then set config.data.text.tokenizer=spm.model.
"""

from __future__ import annotations

from typing import Iterable

from etils import epath

from big_pretrain.data.text.tokenizer import SENTENCEPIECE_SUFFIX, Tokenizer
from big_pretrain.errors import DamagedFileError


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with the Tokenizer interface; its own normalization applies.

  <bos>, <eos> and <pad> are the model's. A model trained without a pad piece
  (SentencePiece's default) pads with id 0, which such models give to <unk>:
  train with ``--pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3`` to get the word
  tokenizer's layout and keep padding distinct. A model without <bos> or <eos>
  just leaves them out, so position 0 then holds the first piece.
  """

  def __init__(self, path: str):
    try:
      import sentencepiece  # Optional: only SentencePiece models need it.
    except ImportError:
      raise ImportError(
          f'Tokenizer {path!r} is a SentencePiece model, but the sentencepiece package is'
          ' not installed: `pip install sentencepiece` (requirements.txt pins the tested'
          ' version), or use a word vocabulary built with `python -m'
          ' big_pretrain.data.text.build_vocabulary tokenizer`.') from None
    if not epath.Path(path).is_file():
      raise FileNotFoundError(
          f'SentencePiece model {path!r} does not exist. Set config.data.text.tokenizer to'
          ' the .model file written by spm_train.')
    try:
      self._processor = sentencepiece.SentencePieceProcessor(
          model_proto=epath.Path(path).read_bytes())
    except (OSError, RuntimeError) as error:
      raise DamagedFileError(
          f'{path!r} could not be read as a SentencePiece model ({error}). Only files'
          f' ending in {SENTENCEPIECE_SUFFIX!r} are read as SentencePiece models; rename a'
          ' word vocabulary to .txt.') from None
    self._path = path
    # -1: the model has no such piece.
    self._bos_id = _present(self._processor.bos_id())
    self._eos_id = _present(self._processor.eos_id())
    self._pad_id = _present(self._processor.pad_id())
    if self._pad_id is None:
      self._pad_id = 0

  @property
  def vocab_size(self) -> int:
    return int(self._processor.get_piece_size())

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  def encode(self, text: str) -> list[int]:
    ids = list(self._processor.encode(text, out_type=int))
    return ([self._bos_id] if self._bos_id is not None else []) + ids + (
        [self._eos_id] if self._eos_id is not None else [])

  def decode(self, ids: Iterable[int]) -> str:
    dropped = {self._pad_id, self._bos_id, self._eos_id}
    return self._processor.decode([int(i) for i in ids if int(i) not in dropped])

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self._path!r}, {self.vocab_size} pieces)'


def _present(piece_id: int) -> int | None:
  return None if piece_id < 0 else int(piece_id)
