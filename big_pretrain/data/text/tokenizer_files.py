"""A tokenizer from its file, and its copy in a stage's folder.

``load_tokenizer`` reads either kind by the file's name: a SentencePiece model
(``.model``, sentencepiece_tokenizer.py) or a word vocabulary (tokenizer.py).
Training copies the configured tokenizer into the stage's folder
(``record_tokenizer``; StageDir names the copy), so a checkpoint is always
evaluated with the tokenizer it was trained with.
"""

from __future__ import annotations

from etils import epath
import jax

from big_pretrain import schema
from big_pretrain.data.text.tokenizer import SENTENCEPIECE_SUFFIX, Tokenizer, WordTokenizer
from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage
from big_pretrain.storage.stage_dir import StageDir


# config.data.text: captions tokenised for image-text objectives (FLIP, LiT).
DATA_KEYS = schema.Group(
    "captions tokenised for image-text objectives ('text_tokens')",
    tokenizer=schema.Key(None, schema.OPTIONAL_TEXT,
                         'a word vocabulary file or a SentencePiece .model; None: no text '
                         '(no text_tokens in batches)', type=str),
    max_length=schema.Key(32, schema.at_least(2, integer=True),
                          "the width of the 'text_tokens' rows: <bos> + caption + <eos>, "
                          'padded or truncated'),
)


def load_tokenizer(path: str) -> Tokenizer:
  """A SentencePiece model for a '.model' file, else a word vocabulary file."""
  if not path:
    raise ValueError(
        'No tokenizer given: set config.data.text.tokenizer to a word vocabulary (e.g.'
        ' big_pretrain.data.text.tokenizer.synthetic_tokenizer_path(), or one built with'
        ' `python -m big_pretrain.data.text.build_vocabulary tokenizer`) or a SentencePiece'
        ' .model file.')
  if path.endswith(SENTENCEPIECE_SUFFIX):
    # Imported here: only .model files need the sentencepiece package.
    # pylint: disable-next=g-import-not-at-top
    from big_pretrain.data.text import sentencepiece_tokenizer
    return sentencepiece_tokenizer.SentencePieceTokenizer(path)
  return WordTokenizer.from_file(path)


def configured_tokenizer_path(data_config) -> str | None:
  """config.data.text.tokenizer, or None when text is off."""
  return data_config.text.tokenizer


def _recorded_path(path: str, workdir: str) -> str:
  folder = StageDir(workdir)
  return (folder.sentencepiece_tokenizer_file if path.endswith(SENTENCEPIECE_SUFFIX)
          else folder.word_tokenizer_file)


def recorded_tokenizer_path(workdir: str) -> str | None:
  """The tokenizer `record_tokenizer` copied into `workdir`, or None if there is none."""
  folder = StageDir(workdir)
  for path in (folder.word_tokenizer_file, folder.sentencepiece_tokenizer_file):
    if epath.Path(path).is_file():
      return path
  return None


def evaluation_tokenizer_path(data_config, workdir: str | None) -> str | None:
  """The tokenizer recorded in `workdir` (the one trained with) if any, else the configured one."""
  recorded = recorded_tokenizer_path(workdir) if workdir else None
  return recorded or configured_tokenizer_path(data_config)


def record_tokenizer(data_config, workdir: str) -> str | None:
  """Copies the configured tokenizer into `workdir` (process 0 writes); returns the copy's path.

  The copy is ``workdir/tokenizer.txt`` (word vocabulary) or
  ``workdir/tokenizer.model`` (SentencePiece). Returns None when
  config.data.text.tokenizer is unset. A workdir that already records a
  different tokenizer is an error: its checkpoints' text embeddings index that
  one's ids.
  """
  path = configured_tokenizer_path(data_config)
  if not path:
    return None
  if not epath.Path(path).is_file():
    raise FileNotFoundError(
        f'config.data.text.tokenizer={path!r} is not a file. Build a word vocabulary with'
        ' `python -m big_pretrain.data.text.build_vocabulary tokenizer ...'
        f' --output={path}`, or point it at a SentencePiece .model file.')
  recorded = _recorded_path(path, workdir)
  if jax.process_index() == 0:
    existing = recorded_tokenizer_path(workdir)
    if existing is not None:
      if storage.absolute(existing) == storage.absolute(path):
        return recorded  # The config already points at the recorded copy.
      configured, copy = epath.Path(path).read_bytes(), epath.Path(existing).read_bytes()
      if existing == recorded and configured == copy:
        return recorded  # the same tokenizer: the usual resume
      fix = (f'It is the copy of the tokenizer {workdir} was trained with: copy that tokenizer '
             f'over it (config.data.text.tokenizer={path!r}, if it is the same one).')
      if len(copy) < len(configured) and configured.startswith(copy):
        raise DamagedFileError(f'{existing} is cut short: its {len(copy)} bytes are the start '
                               f'of the {len(configured)} of {path}. {fix}')
      try:
        load_tokenizer(existing)
      except DamagedFileError as error:
        raise DamagedFileError(f'{error} {fix}') from None
      raise ValueError(
          f'{workdir!r} was trained with the tokenizer recorded in {existing!r}, which'
          f' differs from config.data.text.tokenizer={path!r}. Its checkpoints index that'
          ' tokenizer\'s ids: set config.data.text.tokenizer to the recorded file, or'
          ' train in a new --workdir.')
    storage.write_bytes(recorded, epath.Path(path).read_bytes())  # whole or not at all
  return recorded
