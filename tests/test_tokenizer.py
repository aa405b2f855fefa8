"""Tests for big_pretrain.data.text.tokenizer: word and SentencePiece tokenizers, the build
command, recording in a workdir, and the 'text_tokens' pipeline feature."""

import os
import sys

import numpy as np
from PIL import Image
import pytest

from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data import batch_features
from big_pretrain.data import sources
from big_pretrain.data import train_input
from big_pretrain.data.data_config import default_data_config
from big_pretrain.data.sources import synthetic
from big_pretrain.data.text import build_vocabulary
from big_pretrain.data.text import sentencepiece_tokenizer
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.data.text import tokenizer_files
from helpers.batches import eval_split_batches, first_devices_mesh, small_data_config
from helpers.tiny_config import tiny_mae_config

MAX_LENGTH = 32


def synthetic_tokenizer():
  return tokenizer_files.load_tokenizer(tokenizer_lib.synthetic_tokenizer_path())


def write_text_file(tmp_path, text, name='tokenizer.txt'):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


# --- Normalization, encode and decode ----------------------------------------------

def test_split_words_lowercases_and_splits_off_punctuation():
  assert tokenizer_lib.split_words('  A red, Circle!\ton "Blue" ') == [
      'a', 'red', ',', 'circle', '!', 'on', '"', 'blue', '"']
  assert tokenizer_lib.normalize_text('A  RED circle.') == 'a red circle .'


@pytest.mark.parametrize('text', [
    'a large red circle on a blue background',
    'A Large RED circle   on a blue background',
    'a small, gray star on a white background.',
])
def test_round_trip_gives_the_normalized_text(text):
  tokenizer = tokenizer_lib.build_tokenizer([text], min_count=1, max_size=100)
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer_lib.BOS_ID and ids[-1] == tokenizer_lib.EOS_ID
  assert tokenizer.decode(ids) == tokenizer_lib.normalize_text(text)


def test_synthetic_captions_round_trip_with_the_shipped_tokenizer():
  tokenizer = synthetic_tokenizer()
  source = sources.SyntheticShapes(num_examples=20, image_size=16)
  for index in range(len(source)):
    caption = source[index]['caption']
    assert tokenizer.decode(tokenizer.tokenize(caption, MAX_LENGTH)) == caption


def test_unknown_words_become_unk():
  tokenizer = synthetic_tokenizer()
  ids = tokenizer.encode('a red zebra')
  assert ids == [tokenizer_lib.BOS_ID, tokenizer.token_id('a'), tokenizer.token_id('red'),
                 tokenizer_lib.UNK_ID, tokenizer_lib.EOS_ID]
  assert tokenizer.decode(ids) == 'a red <unk>'
  with pytest.raises(ValueError, match=r'Token id 999 is outside this vocabulary of 31'):
    tokenizer.decode([999])


def test_special_token_ids_and_vocab_size():
  tokenizer = synthetic_tokenizer()
  assert tokenizer.tokens[:4] == ['<pad>', '<bos>', '<eos>', '<unk>']
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  assert tokenizer.vocab_size == len(tokenizer.tokens) == 4 + len(tokenizer.words)


# --- Padding and truncation ----------------------------------------------------------

def test_short_text_is_padded_with_zeros_to_max_length():
  tokenizer = synthetic_tokenizer()
  ids = tokenizer.encode('a red circle')
  row = tokenizer.tokenize('a red circle', 8)
  assert row.shape == (8,) and row.dtype == np.int32
  np.testing.assert_array_equal(row, ids + [0] * (8 - len(ids)))


def test_text_of_exactly_max_length_is_unchanged():
  tokenizer = synthetic_tokenizer()
  ids = tokenizer.encode('a red circle')
  np.testing.assert_array_equal(tokenizer.tokenize('a red circle', len(ids)), ids)


def test_long_text_keeps_bos_and_ends_with_eos():
  tokenizer = synthetic_tokenizer()
  text = 'a large red circle on a blue background'
  ids = tokenizer.encode(text)  # 10 ids.
  row = tokenizer.tokenize(text, 5)
  # The first max_length - 1 ids, then <eos> in the last position.
  np.testing.assert_array_equal(row, ids[:4] + [tokenizer_lib.EOS_ID])
  assert tokenizer.decode(row) == 'a large red'
  np.testing.assert_array_equal(tokenizer.tokenize(text, 2), [tokenizer_lib.BOS_ID,
                                                              tokenizer_lib.EOS_ID])


def test_tokenize_batch_shape_and_errors():
  tokenizer = synthetic_tokenizer()
  texts = ['a red circle', '', 'a large red circle on a blue background ' * 5]
  batch = tokenizer.tokenize_batch(texts, MAX_LENGTH)
  assert batch.shape == (3, MAX_LENGTH) and batch.dtype == np.int32
  for row, text in zip(batch, texts):
    np.testing.assert_array_equal(row, tokenizer.tokenize(text, MAX_LENGTH))
  np.testing.assert_array_equal(batch[1, :3], [tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, 0])
  assert batch[2, -1] == tokenizer_lib.EOS_ID
  assert tokenizer.tokenize_batch([], 4).shape == (0, 4)
  with pytest.raises(ValueError, match=r'max_length=1 must be an integer of at least 2'):
    tokenizer.tokenize_batch(texts, 1)
  with pytest.raises(TypeError, match=r'for one text use tokenize'):
    tokenizer.tokenize_batch('a red circle', MAX_LENGTH)


# --- Building and the file format ---------------------------------------------------

def test_build_counts_occurrences_and_orders_by_frequency_then_alphabetically():
  captions = ['a red circle', 'a blue circle', 'a red square!', 'A Red star']
  tokenizer = tokenizer_lib.build_tokenizer(captions, min_count=1, max_size=100)
  assert tokenizer.words == ['a', 'red', 'circle', '!', 'blue', 'square', 'star']
  # Deterministic: the same captions in another order give the same vocabulary.
  assert tokenizer_lib.build_tokenizer(captions[::-1], 1, 100) == tokenizer


def test_build_respects_min_count_and_max_size():
  captions = ['a red circle', 'a blue circle', 'a red square!', 'A Red star']
  assert tokenizer_lib.build_tokenizer(captions, min_count=2, max_size=100).words == [
      'a', 'red', 'circle']
  assert tokenizer_lib.build_tokenizer(captions, min_count=1, max_size=2).words == ['a', 'red']
  with pytest.raises(ValueError, match='min_count must be at least 1'):
    tokenizer_lib.build_tokenizer(captions, min_count=0, max_size=2)
  with pytest.raises(ValueError, match='max_size must be at least 1'):
    tokenizer_lib.build_tokenizer(captions, min_count=1, max_size=0)


def test_file_round_trip(tmp_path):
  tokenizer = tokenizer_lib.WordTokenizer(['a', 'red', ','])
  path = str(tmp_path / 'nested' / 'tokenizer.txt')
  tokenizer.write(path)
  with open(path, encoding='utf-8') as file:
    assert file.read() == '<pad>\n<bos>\n<eos>\n<unk>\na\nred\n,\n'
  assert tokenizer_files.load_tokenizer(path) == tokenizer


@pytest.mark.parametrize('text, message', [
    ('a\nred\n', r"starts with \['a', 'red'\], but a word vocabulary starts with"),
    ('<pad>\n<bos>\n<eos>\n<unk>\nred\n\nblue\n', r'Line 6 of .* is blank'),
    ('<pad>\n<bos>\n<eos>\n<unk>\nred\nblue\nred\n',
     r"line 7 of .*: 'red' is already listed at line 5"),
    ('<pad>\n<bos>\n<eos>\n<unk>\nRed\n', r"line 5 of .*: 'Red' is not one normalized token"),
    ('<pad>\n<bos>\n<eos>\n<unk>\nred circle\n', r"'red circle' is not one normalized token"),
    ('<pad>\n<bos>\n<eos>\n<unk>\n<unk>\n', r"line 5 of .*: '<unk>' is a special token"),
])
def test_bad_vocabulary_files_name_the_line(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    tokenizer_files.load_tokenizer(write_text_file(tmp_path, text))


def test_missing_file_says_how_to_build_one(tmp_path):
  missing = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError,
                     match=r'python -m big_pretrain\.data\.text\.build_vocabulary tokenizer'):
    tokenizer_files.load_tokenizer(missing)
  with pytest.raises(ValueError, match=r'set config\.data\.text\.tokenizer'):
    tokenizer_files.load_tokenizer(None)


def test_shipped_synthetic_tokenizer_is_what_the_build_command_writes(tmp_path, capsys):
  output = str(tmp_path / 'rebuilt.txt')
  assert build_vocabulary.main(
      ['tokenizer', *build_vocabulary.SYNTHETIC_BUILD_FLAGS, f'--output={output}']) == 0
  assert '0 of 16000 word occurrences are not in the vocabulary' in capsys.readouterr().out
  with open(output, encoding='utf-8') as rebuilt, open(
      tokenizer_lib.synthetic_tokenizer_path(), encoding='utf-8') as shipped:
    assert rebuilt.read() == shipped.read()


def test_shipped_synthetic_tokenizer_covers_every_caption_word():
  # Every word the synthetic caption template can produce, not only those drawn.
  words = {'a', 'on', 'background', *synthetic.SHAPE_NAMES,
           *(name for name, _ in synthetic.PALETTE), *(name for name, _ in synthetic.SIZES)}
  assert set(synthetic_tokenizer().words) == words


def test_command_over_an_image_folder(tmp_path, capsys):
  for class_name, caption in (('cats', 'A cat, sleeping.'), ('dogs', 'A dog')):
    (tmp_path / 'data' / class_name).mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'data' / class_name / 'one.png')
    (tmp_path / 'data' / class_name / 'one.txt').write_text(caption, encoding='utf-8')
  Image.new('RGB', (8, 8)).save(tmp_path / 'data' / 'dogs' / 'uncaptioned.png')
  output = str(tmp_path / 'tokenizer.txt')
  assert build_vocabulary.main(['tokenizer', '--source=image_folder', f'--path={tmp_path / "data"}',
                             f'--output={output}']) == 0
  assert '1 examples have no caption' in capsys.readouterr().err
  assert tokenizer_files.load_tokenizer(output).words == ['a', ',', '.', 'cat', 'dog', 'sleeping']
  # Nothing reaches --min_count: nothing is written, and the exit status says so.
  assert build_vocabulary.main(['tokenizer', '--source=image_folder', f'--path={tmp_path / "data"}',
                             '--min_count=5', f'--output={tmp_path / "none.txt"}']) == 1
  assert not os.path.exists(tmp_path / 'none.txt')


# --- Recording the tokenizer in the workdir -----------------------------------------

def test_record_tokenizer_copies_the_configured_file(tmp_path):
  config = default_data_config()
  assert tokenizer_files.record_tokenizer(config, str(tmp_path / 'unused')) is None
  config.text.tokenizer = tokenizer_lib.synthetic_tokenizer_path()
  workdir = str(tmp_path / 'workdir')
  recorded = tokenizer_files.record_tokenizer(config, workdir)
  assert recorded == os.path.join(workdir, 'tokenizer.txt')
  assert synthetic_tokenizer() == tokenizer_files.load_tokenizer(recorded)
  assert tokenizer_files.evaluation_tokenizer_path(config, workdir) == recorded
  # Resuming with the same tokenizer, or with the recorded copy itself, is fine.
  assert tokenizer_files.record_tokenizer(config, workdir) == recorded
  config.text.tokenizer = recorded
  assert tokenizer_files.record_tokenizer(config, workdir) == recorded
  # Another tokenizer would silently change what the checkpoint's token ids mean.
  other = str(tmp_path / 'other.txt')
  tokenizer_lib.WordTokenizer(['a']).write(other)
  config.text.tokenizer = other
  with pytest.raises(ValueError, match=r'was trained with the tokenizer recorded in'):
    tokenizer_files.record_tokenizer(config, workdir)
  config.text.tokenizer = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError, match=r'missing\.txt.* is not a file'):
    tokenizer_files.record_tokenizer(config, workdir)


# --- SentencePiece ---------------------------------------------------------------

def train_sentencepiece(tmp_path, **flags):
  sentencepiece = pytest.importorskip('sentencepiece')
  source = sources.SyntheticShapes(num_examples=200, image_size=16)
  corpus = tmp_path / 'captions.txt'
  corpus.write_text('\n'.join(source[i]['caption'] for i in range(len(source))))
  prefix = str(tmp_path / 'spm')
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=50, minloglevel=2, **flags)
  return prefix + '.model'


def test_sentencepiece_model_has_the_same_interface(tmp_path):
  path = train_sentencepiece(tmp_path)
  tokenizer = tokenizer_files.load_tokenizer(path)
  assert isinstance(tokenizer, sentencepiece_tokenizer.SentencePieceTokenizer)
  assert tokenizer.vocab_size == 50
  # SentencePiece's defaults: <unk> 0, <bos> 1, <eos> 2, no <pad>, so padding falls back to 0.
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
  caption = 'a large red circle on a blue background'
  ids = tokenizer.encode(caption)
  assert ids[0] == 1 and ids[-1] == 2
  assert tokenizer.decode(ids) == caption
  row = tokenizer.tokenize(caption, MAX_LENGTH)
  assert row.shape == (MAX_LENGTH,) and row.dtype == np.int32
  np.testing.assert_array_equal(row, ids + [0] * (MAX_LENGTH - len(ids)))
  truncated = tokenizer.tokenize(caption, 4)
  np.testing.assert_array_equal(truncated, ids[:3] + [2])


def test_sentencepiece_model_with_a_pad_piece_pads_with_it(tmp_path):
  path = train_sentencepiece(tmp_path, pad_id=0, bos_id=1, eos_id=2, unk_id=3)
  tokenizer = tokenizer_files.load_tokenizer(path)
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  row = tokenizer.tokenize('a red star', MAX_LENGTH)
  assert row[0] == 1 and row[-1] == 0 and 3 not in row
  # Recorded in a workdir under a name that keeps it a SentencePiece model.
  config = default_data_config()
  config.text.tokenizer = path
  recorded = tokenizer_files.record_tokenizer(config, str(tmp_path / 'workdir'))
  assert recorded.endswith('tokenizer.model')
  assert isinstance(tokenizer_files.load_tokenizer(recorded),
                    sentencepiece_tokenizer.SentencePieceTokenizer)


def test_sentencepiece_model_without_the_package_says_pip_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'sentencepiece', None)  # Makes the import fail.
  with pytest.raises(ImportError, match=r'pip install sentencepiece'):
    tokenizer_files.load_tokenizer(str(tmp_path / 'spm.model'))


def test_unreadable_sentencepiece_model_is_named(tmp_path):
  pytest.importorskip('sentencepiece')
  path = write_text_file(tmp_path, 'not a model', name='broken.model')
  with pytest.raises(ValueError, match=r'broken\.model.* could not be read as a SentencePiece'):
    tokenizer_files.load_tokenizer(path)


# --- The pipeline feature ------------------------------------------------------------

def text_data_config(tokenizer_path=None, num_examples=16):
  """small_data_config over `num_examples` synthetic 16x16 images, their captions tokenised by
  the tokenizer at `tokenizer_path` (None: no text tokens)."""
  config = small_data_config(num_examples=num_examples, source_image_size=16, image_size=16)
  config.text.tokenizer = tokenizer_path
  return config


def test_pipeline_without_tokenizer_has_no_text_tokens():
  config = text_data_config()
  assert batch_features.device_feature_names(config) == batch_features.DEVICE_FEATURES
  data = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  assert set(data.next_local_numpy()) == {'image', 'label'}
  assert data.text_tokenizer is None
  assert 'text_tokens' not in eval_split_batches(config, global_batch_size=8)[0]


def test_pipeline_batches_carry_the_tokenised_captions():
  config = text_data_config(tokenizer_lib.synthetic_tokenizer_path())
  assert batch_features.device_feature_names(config)[-1] == 'text_tokens'
  # One batch of evaluation holds every example of the source once.
  (batch,) = eval_split_batches(config, global_batch_size=16)
  assert batch['text_tokens'].shape == (16, MAX_LENGTH)
  assert batch['text_tokens'].dtype == np.int32
  source = sources.build_source(config)
  captions = [source[i]['caption'] for i in range(len(source))]
  tokenizer = tokenizer_files.load_tokenizer(config.text.tokenizer)
  expected = tokenizer.tokenize_batch(captions, MAX_LENGTH)
  # The eval order is a fixed shuffle: compare (label, tokens) pairs as multisets.
  got = sorted((int(label), tuple(row)) for label, row in
               zip(np.asarray(batch['label']), np.asarray(batch['text_tokens'])))
  want = sorted((source[i]['label'], tuple(row)) for i, row in enumerate(expected))
  assert got == want


def test_a_bad_max_length_is_refused_and_the_pipeline_names_a_missing_tokenizer(tmp_path):
  stage = tiny_mae_config()  # max_length is checked once, by config validation
  stage.data = text_data_config(tokenizer_lib.synthetic_tokenizer_path())
  stage.data.text.max_length = 1
  with pytest.raises(ValueError, match=r'config\.data\.text\.max_length=1: must be'):
    validate_stage_config(stage)
  config = text_data_config(str(tmp_path / 'missing.txt'))
  with pytest.raises(FileNotFoundError, match=r'missing\.txt.*build_vocabulary tokenizer'):
    train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
