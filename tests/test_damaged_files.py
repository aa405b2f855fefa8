"""Damaged files a run reads from a workdir or a data path: each one is named in one line with
what to do, or set aside (kept as *.damaged) and rebuilt where it can be; nothing is deleted.

Pseudo-label job files are tested with the job itself, in test_self_training.py; config.json
in test_main.py.
"""

import json
import logging
import os

import pytest

from big_pretrain.config.defaults import chain_config
from big_pretrain.data import records
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data import sources
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
from reliability.damaged_file_checks import (DAMAGED_DATA_FILES, VALIDATING,
                                             fingerprint_tree)


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


@pytest.mark.integration
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


@pytest.mark.parametrize('damaged', DAMAGED_DATA_FILES, ids=lambda damaged: damaged.name)
def test_a_damaged_data_file_is_refused_in_one_line_and_left_as_it_was(tmp_path, damaged):
  """The list the bad-inputs table also runs end to end (reliability/damaged_file_checks.py):
  refused by validation before any compile, or (a shard's records) when the source opens."""
  config = tiny_mae_config(**damaged.damage(str(tmp_path)))
  before = fingerprint_tree(str(tmp_path / 'data'))
  if damaged.found_when == VALIDATING:
    with pytest.raises(ConfigError, match=damaged.evidence) as raised:
      validate_config(config)
  else:
    validate_config(config)
    with pytest.raises(DamagedFileError, match=damaged.evidence) as raised:
      sources.build_source(config.data)
  assert '\n' not in str(raised.value) and isinstance(raised.value, UserFacingError)
  assert fingerprint_tree(str(tmp_path / 'data')) == before


def test_a_truncated_array_record_shard_is_named_with_what_to_do(tmp_path):
  config = tiny_mae_config(**DAMAGED_DATA_FILES[0].damage(str(tmp_path)))
  shard = next((tmp_path / 'data').glob('*.array_record'))
  with pytest.raises(DamagedFileError) as raised:
    sources.build_source(config.data)
  message = str(raised.value)
  assert message.startswith(f'ArrayRecord shard {shard} cannot be read: it is not a whole '
                            'ArrayRecord file')
  assert 'Copy it again from where it was converted, or convert again' in message


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
