"""`python -m big_pretrain.export`'s --output: never a run's folder, never what an export did
not write, written whole (a failure mid-export leaves the previous export as it was), and
each refusal one line with exit 2, before any checkpoint is read."""

import errno
import json
import os

import pytest

from big_pretrain import export as export_lib
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.storage import files as storage_files
from big_pretrain.train.loop import train_stage
from helpers.tiny_config import one_device, tiny_wsp_config

TIMM_FILES = ['config.json', 'model.safetensors']
HF_FILES = ['config.json', 'model.safetensors', 'preprocessor_config.json']


@pytest.fixture(scope='module', name='stage')
def fixture_stage(tmp_path_factory):
  """A trained tiny WSP stage (2 steps) in a chain's workdir: WORKDIR/wsp."""
  stage = tmp_path_factory.mktemp('run') / 'wsp'
  train_stage(tiny_wsp_config(), str(stage), devices=one_device())
  return stage


def _export(stage, output, *flags):
  """export.main's exit code: None when it wrote the export."""
  try:
    export_lib.main([str(stage), f'--output={output}', *flags])
  except SystemExit as stopped:
    return stopped.code
  return None


def _contents(folder):
  return {path.name: path.read_bytes() for path in folder.iterdir()}


def _exported_format(folder):
  return export_lib.previous_export_format(str(folder))


@pytest.mark.integration
def test_each_refusal_is_one_line_and_exit_2_before_any_checkpoint_is_read(
    stage, tmp_path, capsys, monkeypatch):
  def must_not_read(*args, **kwargs):
    raise AssertionError('a checkpoint was read')
  monkeypatch.setattr(init_from_lib, 'resolve_checkpoint_dir', must_not_read)
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  stray = tmp_path / 'stray'
  stray.mkdir()
  (stray / 'config.json').write_text('{}')
  (stray / 'notes.txt').write_text('mine')
  workdir = stage.parent
  timm = ['--format=timm']
  cases = [
      ('a file', a_file, timm, f'--output={a_file} is a file, not a folder'),
      ('the stage folder', stage, timm, f'{stage} is a stage folder (it holds config.json and '
                                        'checkpoints/)'),
      ('inside the stage', stage / 'timm', timm, f'{stage} is a stage folder'),
      ('the workdir', workdir, timm, f'{workdir} is the workdir of a run (it holds the stage '
                                     'folders wsp)'),
      ('inside the workdir', workdir / 'exported' / 'wsp_timm', timm,
       f'{workdir} is the workdir of a run'),
      ('a stray file, even with --overwrite', stray, [*timm, '--overwrite'],
       "holds 'notes.txt', which no export writes, so even --overwrite does not replace"),
      ('another format', tmp_path / 'out', ['--format=onnx'],
       "--format='onnx': choose one of timm, hf."),
      ('a step that is no number', tmp_path / 'out', [*timm, '--step=abc'],
       "--step='abc': give a step number (the folders in STAGE/checkpoints/)"),
      ('a step that is not there', tmp_path / 'out', [*timm, '--step=999'],
       f'Step 999 of {stage} cannot be read (there is no such step)'),
  ]
  config_before = (stage / 'config.json').read_bytes()
  failures = []
  for name, output, flags, expected in cases:
    code = _export(stage, output, *flags)
    lines = capsys.readouterr().err.strip().splitlines()
    if code != 2 or len(lines) != 1 or not lines[0].startswith('big_pretrain.export: ') or (
        expected not in lines[0]):
      failures.append(f'{name}: exit {code}, stderr {lines}')
  assert not failures, '\n'.join(failures)
  assert (stage / 'config.json').read_bytes() == config_before  # byte for byte
  assert sorted(os.listdir(stray)) == ['config.json', 'notes.txt']
  assert not (tmp_path / 'out').exists() and not (workdir / 'exported').exists()


@pytest.mark.integration
def test_a_read_only_output_is_refused_even_for_root(stage, tmp_path, capsys, monkeypatch):
  # Root writes through mode bits, and a test cannot mount a read-only file system: the
  # write that check_writable_folder tries for real fails as on a read-only mount.
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  real_open = open

  def read_only_mount(path, mode='r', *args, **kwargs):
    if str(path).startswith(str(read_only)) and set(mode) & set('wax+'):
      raise OSError(errno.EROFS, 'Read-only file system', path)
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr('builtins.open', read_only_mount)
  assert _export(stage, read_only / 'timm', '--format=timm') == 2
  assert capsys.readouterr().err == (
      f'big_pretrain.export: --output={read_only / "timm"}: {read_only} is not writable by this '
      'user: give a folder this user can write, for the export alone.\n')


@pytest.mark.integration
def test_an_export_replaces_an_export_of_its_format_and_others_only_with_overwrite(
    stage, tmp_path, capsys):
  out = tmp_path / 'out'
  assert _export(stage, out, '--format=timm') is None
  assert sorted(_contents(out)) == TIMM_FILES and _exported_format(out) == 'timm'
  assert _export(stage, out, '--format=timm') is None  # the same format again: replaced
  timm = _contents(out)
  capsys.readouterr()
  assert _export(stage, out, '--format=hf') == 2
  assert capsys.readouterr().err == (
      f'big_pretrain.export: --output={out} holds a timm export: add --overwrite to replace '
      'it with the hf export (every file of it), or give another folder.\n')
  assert _contents(out) == timm
  assert _export(stage, out, '--format=hf', '--overwrite') is None
  assert sorted(_contents(out)) == HF_FILES and _exported_format(out) == 'hf'
  assert json.loads((out / 'config.json').read_text())['architectures'] == [
      'ViTForImageClassification']
  assert sorted(os.listdir(tmp_path)) == ['out']  # nothing left beside it


@pytest.mark.integration
def test_a_failure_while_writing_leaves_the_previous_export_and_nothing_beside_it(
    stage, tmp_path, capsys, monkeypatch):
  out = tmp_path / 'out'
  assert _export(stage, out, '--format=timm') is None
  before = _contents(out)
  real_write_bytes = storage_files.write_bytes

  def disk_full_in_the_weights(path, data):
    if path.endswith('model.safetensors'):
      real_write_bytes(path, data[:len(data) // 2])
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    real_write_bytes(path, data)
  monkeypatch.setattr(storage_files, 'write_bytes', disk_full_in_the_weights)
  capsys.readouterr()
  assert _export(stage, out, '--format=hf', '--overwrite') == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'big_pretrain.export: Cannot write the export to {out} (')
  assert 'No space left on device' in lines[0] and lines[0].endswith('it is as it was.')
  assert _contents(out) == before
  assert sorted(os.listdir(tmp_path)) == ['out']
