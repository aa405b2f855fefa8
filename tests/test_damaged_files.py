"""Damaged files a run reads from a workdir or a data path: each one is named in one line with
what to do, or set aside (kept as *.damaged) and rebuilt where it can be; nothing is deleted.

Pseudo-label job files are tested with the job itself, in test_self_training.py; config.json
in test_main.py.
"""

import json
import logging
import os
import shutil

import pytest

from big_pretrain.config.defaults import chain_config
from big_pretrain.data import records
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data.sources.array_record import ArrayRecordSource
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.data.text import tokenizer_files
from big_pretrain.errors import ConfigError, DamagedFileError, UserFacingError
from big_pretrain.evaluators import evaluator_config
from big_pretrain.stages import chain
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.stages.pseudo_label_job import read_teacher_config
from big_pretrain.storage import files as storage
from big_pretrain.storage import resume_identity
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train.loop import train_stage
from helpers.tiny_config import one_device, tiny_mae_config

HERE = os.path.dirname(__file__)
SHARDS_FOLDER = os.path.join(HERE, 'data', 'shards_written_with_tensorflow')


def _cut_in_half(path) -> bytes:
  """Truncates `path` to half its bytes, as a full disk or an unfinished copy would; returns
  what it held."""
  with open(path, 'rb') as f:
    whole = f.read()
  with open(path, 'wb') as f:
    f.write(whole[:len(whole) // 2])
  return whole


@pytest.mark.parametrize('content, problem', [
    (b'{"step": 4, "reconstruction": {"mse"', 'JSONDecodeError'),
    (b'', 'JSONDecodeError'),
    (b'\xff\xfe\x00garbage', 'UnicodeDecodeError'),
    (b'[1, 2]', 'holds a list'),
])
def test_a_json_file_that_is_not_one_whole_object_is_named_with_what_to_do(
    tmp_path, content, problem):
  path = tmp_path / 'eval_results.json'
  path.write_bytes(content)
  with pytest.raises(DamagedFileError) as raised:
    storage.read_json(str(path), if_damaged='Do this.')
  message = str(raised.value)
  assert message.startswith(str(path)) and problem in message and message.endswith('Do this.')
  assert '\n' not in message and isinstance(raised.value, UserFacingError)
  assert path.read_bytes() == content  # reading changes nothing


def test_set_aside_keeps_every_damaged_copy(tmp_path):
  path = tmp_path / 'eval_results.json'
  for content in (b'first', b'second'):
    path.write_bytes(content)
    storage.set_aside(str(path))
  assert not path.exists()
  assert (tmp_path / 'eval_results.json.damaged').read_bytes() == b'first'
  assert (tmp_path / 'eval_results.json.damaged.2').read_bytes() == b'second'


def test_a_damaged_eval_results_json_is_set_aside_and_the_final_evaluations_run_again(
    tmp_path, caplog):
  config = tiny_mae_config(total_steps=2)
  config.evals.reconstruction = evaluator_config('reconstruction', num_images=8, every_steps=2)
  workdir = str(tmp_path)
  first = train_stage(config, workdir, devices=one_device())
  results = StageDir(workdir).eval_results_file
  whole = _cut_in_half(results)
  with caplog.at_level(logging.WARNING):
    rerun = train_stage(config, workdir, devices=one_device())
  assert rerun.steps_run == 0 and rerun.eval_results == first.eval_results
  assert json.loads(open(results, encoding='utf-8').read())['step'] == 2  # rebuilt
  with open(results + '.damaged', 'rb') as f:
    assert f.read() == whole[:len(whole) // 2]  # kept as it was
  assert 'eval_results.json cannot be read' in caplog.text
  assert 'Set aside as eval_results.json.damaged' in caplog.text


def test_damaged_results_are_left_out_of_a_chains_summary_and_set_aside(tmp_path, caplog):
  stage = StageDir(str(tmp_path))
  stage.write_results(stage.at_start_results_file, 0, {'probe': {'accuracy': 0.1}})
  stage.write_results(stage.eval_results_file, 4, {'probe': {'accuracy': 0.5}})
  _cut_in_half(stage.at_start_results_file)
  with caplog.at_level(logging.WARNING):
    results = chain.collect_eval_results(chain_config(mae=tiny_mae_config()),
                                         {'mae': str(tmp_path)})
  assert results == {'mae': {'step': 4, 'probe': {'accuracy': 0.5}}}
  assert os.path.exists(stage.at_start_results_file + '.damaged')
  assert 'eval_results_at_start.json cannot be read' in caplog.text


def test_a_damaged_config_history_is_set_aside_and_a_new_one_started(tmp_path, caplog):
  config = tiny_mae_config()
  workdir = str(tmp_path)
  resume_identity.record_start(config, workdir, 0, None)
  history = StageDir(workdir).history_file
  whole = _cut_in_half(history)
  with caplog.at_level(logging.WARNING):
    resume_identity.record_start(config, workdir, 4, None)
  lines = open(history, encoding='utf-8').read().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [4]
  with open(history + '.damaged', 'rb') as f:
    assert f.read() == whole[:len(whole) // 2]
  assert 'config_history.jsonl cannot be read' in caplog.text


def test_a_damaged_teacher_config_is_named_with_what_to_do(tmp_path):
  resume_identity.record_start(tiny_mae_config(), str(tmp_path), 0, None)
  _cut_in_half(StageDir(str(tmp_path)).config_file)
  with pytest.raises(DamagedFileError, match=r"config\.json cannot be read .*teacher's config"):
    read_teacher_config(str(tmp_path))


@pytest.mark.parametrize('content', [b'{"format": "big_pretrain.pseudo_labels"', b'[]',
                                     b'{"format": "something else", "format_version": 1}'])
def test_damaged_pseudo_label_metadata_read_by_a_student_is_named(tmp_path, content):
  (tmp_path / records.METADATA_FILE).write_bytes(content)
  with pytest.raises(DamagedFileError, match=records.METADATA_FILE):
    pseudo_labelled.read_metadata(str(tmp_path))


def test_a_truncated_array_record_shard_is_named_with_what_to_do(tmp_path):
  folder = tmp_path / 'converted'
  shutil.copytree(SHARDS_FOLDER, folder)
  shard = next(folder.glob('*.array_record'))
  _cut_in_half(shard)
  with pytest.raises(DamagedFileError) as raised:
    ArrayRecordSource(str(folder))
  message = str(raised.value)
  assert message.startswith(f'ArrayRecord shard {shard} cannot be read: it is not a whole '
                            'ArrayRecord file')
  assert 'Copy it again from where it was converted, or convert again' in message


@pytest.mark.parametrize('content', [b'{"format": "big_pretrain.array_record", "shar', b'\xff'])
def test_a_damaged_converter_metadata_is_refused_before_any_compile(tmp_path, content):
  folder = tmp_path / 'converted'
  shutil.copytree(SHARDS_FOLDER, folder)
  (folder / records.METADATA_FILE).write_bytes(content)
  config = tiny_mae_config(**{'data.source': 'array_record', 'data.path': str(folder)})
  with pytest.raises(ConfigError, match=r'config\.data\.path: .*metadata\.json cannot be read'):
    validate_config(config)


@pytest.mark.parametrize('content, problem', [
    (b'', 'has no labels'),
    (b'\xff\xfecircle\n', 'is not UTF-8'),
    (b'circle\nsquare\ncircle\n', 'already defined at line 1'),
])
def test_a_damaged_label_vocabulary_is_refused_before_any_compile(tmp_path, content, problem):
  path = tmp_path / 'vocab.txt'
  path.write_bytes(content)
  with pytest.raises(DamagedFileError, match=problem):
    labels_lib.LabelVocabulary.from_file(str(path))
  with pytest.raises(ConfigError, match=rf'config\.data\.labels\.vocabulary: .*{problem}'):
    validate_config(tiny_mae_config(**{'data.labels.vocabulary': str(path)}))


@pytest.mark.parametrize('cut', [0.0, 0.5])
def test_a_damaged_tokenizer_is_refused_before_any_compile(tmp_path, cut):
  with open(tokenizer_lib.synthetic_tokenizer_path(), 'rb') as f:
    whole = f.read()
  path = tmp_path / 'tokenizer.txt'
  path.write_bytes(whole[:int(len(whole) * cut)] + b'\n\n')  # cut short, a blank line after
  with pytest.raises(DamagedFileError, match='(?i)tokenizer file'):
    tokenizer_files.load_tokenizer(str(path))
  config = tiny_mae_config(**{'data.text.tokenizer': str(path)})
  with pytest.raises(ConfigError, match=r'(?i)config\.data\.text\.tokenizer: .*tokenizer file'):
    validate_config(config)


def test_a_damaged_sentencepiece_model_is_named(tmp_path):
  path = tmp_path / 'spm.model'
  path.write_bytes(b'\x0a\x05not a model')
  with pytest.raises(DamagedFileError, match='could not be read as a SentencePiece model'):
    pytest.importorskip('sentencepiece')
    tokenizer_files.load_tokenizer(str(path))


def test_a_damaged_copy_of_the_tokenizer_in_the_workdir_is_named_not_called_different(
    tmp_path):
  config = tiny_mae_config(**{'data.text.tokenizer': tokenizer_lib.synthetic_tokenizer_path()})
  workdir = str(tmp_path)
  recorded = tokenizer_files.record_tokenizer(config.data, workdir)
  whole = _cut_in_half(recorded)
  with pytest.raises(DamagedFileError, match=rf'tokenizer.txt is cut short: its {len(whole) // 2} '
                                             r'bytes .*copy of the tokenizer .* was trained with'):
    tokenizer_files.record_tokenizer(config.data, workdir)
  with open(recorded, 'wb') as f:
    f.write(b'\xff' + whole)  # not text at all
  with pytest.raises(DamagedFileError, match=r'not UTF-8.*copy that tokenizer over it'):
    tokenizer_files.record_tokenizer(config.data, workdir)
