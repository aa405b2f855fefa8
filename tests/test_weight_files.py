"""Reading foreign weight files (big_pretrain/weights/weight_files.py and the modules it
reads with): every dtype public checkpoints ship in, read exactly; a file whose bytes are not
what its name says, a damaged safetensors header, a .pth holding more than tensors, weights
with NaN or Inf, a model folder missing a file: each refused in one line naming the file and
the culprit, by the cheap check done before any model is built as by the reader.

The files are written by the real libraries (torch, safetensors.torch, numpy).
"""

import argparse
import json
import logging
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
pytestmark = pytest.mark.interop  # the test tiers: pytest.ini

from big_pretrain.errors import (CheckpointMismatchError, CheckpointUnreadableError,  # noqa: E402
                                 DamagedFileError, NonFiniteWeightsError)
from big_pretrain.weights import public_checkpoints, weight_files  # noqa: E402

# Values that probe every part of a float format: signs, zeros, the extremes, subnormals.
_PROBES = [0.0, -0.0, 1.0, -1.5, 3.0e-3, 448.0, 57344.0, 65504.0, 1e-7, 2.0 ** -133, 3.0e38]
# A few timm ViT names and HF ViT names: a folder without config.json is told apart by them.
_TIMM_STATE = {'patch_embed.proj.weight': np.ones((4, 3, 2, 2), np.float32),
               'blocks.0.norm1.weight': np.ones(4, np.float32)}
_HF_STATE = {'embeddings.patch_embeddings.projection.weight': np.ones((4, 3, 2, 2), np.float32),
             'encoder.layer.0.layernorm_before.weight': np.ones(4, np.float32)}


def _seeded():
  return torch.Generator().manual_seed(0)


def _one_line_error(error_type, match, run):
  with pytest.raises(error_type, match=match) as error:
    run()
  message = str(error.value)
  assert '\n' not in message and '\x1b' not in message, message
  return message


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_narrow_floats_are_read_as_float32_exactly(dtype, tmp_path):
  """Every value of the file, widened to float32 bit for bit (an exact conversion: every
  value of these formats is a float32 value), as torch widens it."""
  finite = torch.tensor(_PROBES).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
  values = torch.cat([finite, torch.randn(64, generator=_seeded()) * 10]).to(dtype)
  tensors = {'weight': values.reshape(3, 25), 'scalar': values[2].clone()}
  path = str(tmp_path / 'narrow.safetensors')
  safetensors_torch.save_file(tensors, path)
  read = weight_files.read_safetensors(path)
  for name, tensor in tensors.items():
    expected = tensor.float().numpy()
    assert read[name].dtype == np.float32 and read[name].shape == expected.shape
    np.testing.assert_array_equal(read[name].view(np.uint32), expected.view(np.uint32))


def test_wide_floats_integers_and_booleans_are_read_as_they_are(tmp_path):
  tensors = {'f32': torch.randn(2, 3, generator=_seeded()),
             'f64': torch.randn(4, dtype=torch.float64, generator=_seeded()),
             'i64': torch.arange(-3, 3), 'i32': torch.arange(5, dtype=torch.int32),
             'i16': torch.arange(5, dtype=torch.int16), 'i8': torch.arange(-2, 2, dtype=torch.int8),
             'u8': torch.arange(250, 256, dtype=torch.uint8), 'bool': torch.tensor([True, False]),
             'empty': torch.zeros(0, 3)}
  path = str(tmp_path / 'wide.safetensors')
  safetensors_torch.save_file(tensors, path)
  read = weight_files.read_safetensors(path)
  for name, tensor in tensors.items():
    assert read[name].dtype == tensor.numpy().dtype, name
    np.testing.assert_array_equal(read[name], tensor.numpy())


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + data


_F32_PAIR = {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
             'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [8, 16]}}


def _edited(name: str, **fields) -> dict:
  return {**_F32_PAIR, name: {**_F32_PAIR[name], **fields}}


@pytest.mark.parametrize('content,match', [
    (_safetensors_bytes(_F32_PAIR, bytes(16))[:5], r'too short to hold the header length'),
    (_safetensors_bytes(_F32_PAIR, bytes(16))[:40], r'its header is \d+ bytes long, but only '
                                                    r'32 follow: it is cut short'),
    (_safetensors_bytes(_F32_PAIR, bytes(12)), r"tensor 'b' ends at byte 16 of the data, which "
                                               r'has 12: the file is cut short'),
    (_safetensors_bytes(_edited('b', data_offsets=[8, 400]), bytes(16)), r"tensor 'b' ends at "
                                                                         r'byte 400'),
    (_safetensors_bytes(_edited('b', shape=[3]), bytes(16)),
     r"tensor 'b' has 8 bytes, and its shape \[3\] of F32 needs 12"),
    (_safetensors_bytes(_edited('b', data_offsets=[4, 12]), bytes(16)),
     r"tensor 'b' \(bytes 4..12\) overlaps tensor 'a'"),
    (_safetensors_bytes(_edited('a', data_offsets=[4, 12], shape=[2]), bytes(16)),
     r"bytes 0..4 of the data, between the header and tensor 'a', belong to no tensor"),
    (_safetensors_bytes(_F32_PAIR, bytes(20)), r'the last 4 bytes of the data belong to no '
                                               r'tensor'),
    (_safetensors_bytes(_edited('a', data_offsets=[8, 0]), bytes(16)),
     r"tensor 'a' has data_offsets \[8, 0\], not \[begin, end\]"),
    (_safetensors_bytes(_edited('a', shape=[-2]), bytes(16)), r"tensor 'a' has shape \[-2\]"),
    (_safetensors_bytes(_edited('a', dtype='F4'), bytes(16)),
     r"tensor 'a' has dtype 'F4', which this does not read .*Convert the file"),
    (struct.pack('<Q', 9) + b'{"a": [1,' + bytes(16), r'its header is not JSON'),
    (_safetensors_bytes([1, 2], b''), r'its header is a JSON list, not an object'),
])
def test_a_damaged_safetensors_file_is_named_in_one_line(content, match, tmp_path):
  """Found by the cheap check (the header alone) and by the reader alike."""
  path = tmp_path / 'damaged.safetensors'
  path.write_bytes(content)
  for run in (lambda: weight_files.read_safetensors(str(path)),
              lambda: public_checkpoints.check_public_checkpoint(str(path))):
    message = _one_line_error(DamagedFileError, match, run)
    assert message.startswith(f'{path} is not a readable safetensors file: ')


def _write_zip_pth(path):
  torch.save({'model': {'w': torch.ones(2)}}, path)


def _write_safetensors(path):
  safetensors_torch.save_file({'w': torch.ones(2)}, path)


def _write_npz(path):
  with open(path, 'wb') as f:  # np.savez would add .npz to a path named otherwise
    np.savez(f, w=np.ones(2, np.float32))


@pytest.mark.parametrize('name,write,match', [
    ('model.safetensors', _write_zip_pth,
     r'is named as a safetensors file, but its bytes are a PyTorch checkpoint: rename it to '
     r'end in \.pth\.'),
    ('weights.pth', _write_safetensors,
     r'is named as a PyTorch checkpoint, but its bytes are a safetensors file: rename it to '
     r'end in \.safetensors\.'),
    ('weights.safetensors', _write_npz,
     r'bytes are a NumPy \.npz archive: rename it to end in \.npz\.'),
    ('weights.npz', _write_zip_pth, r'bytes are a PyTorch checkpoint: rename it to end in \.pth'),
    ('mae_pretrain_vit_base.pth', lambda path: open(path, 'w').write(
        '<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>'),
     r'bytes are an HTML page \(a failed or redirected download\?\): download or export it '
     r'again\.'),
    ('pytorch_model.bin', lambda path: open(path, 'w').write(
        'version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n'),
     r'bytes are a Git LFS pointer, not the weights \(git lfs pull fetches them\)'),
    ('model.safetensors', lambda path: open(path, 'w').write('Entry not found'),
     r"bytes are text \('Entry not found'\)"),
    ('weights.pth', lambda path: open(path, 'w').close(), r'bytes are empty'),
])
def test_a_file_whose_bytes_are_not_what_its_name_says_is_named_as_what_it_is(
    name, write, match, tmp_path):
  path = str(tmp_path / name)
  write(path)
  for run in (lambda: public_checkpoints.read_state(path),
              lambda: public_checkpoints.check_public_checkpoint(path)):
    _one_line_error(DamagedFileError, match, run)


def test_an_unknown_suffix_is_named_with_what_its_bytes_are(tmp_path):
  path = str(tmp_path / 'weights.ckpt')
  _write_safetensors(path)
  assert public_checkpoints.is_public_checkpoint(path)  # a file: never an Orbax checkpoint
  for run in (lambda: public_checkpoints.read_state(path),
              lambda: public_checkpoints.check_public_checkpoint(path)):
    _one_line_error(CheckpointMismatchError, r'unknown checkpoint format \(its bytes are a '
                    r'safetensors file\): rename it to end in \.safetensors\.', run)


class _RunsACommand:
  """What a malicious checkpoint holds: unpickling it would run a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('zip_format', [True, False])
@pytest.mark.parametrize('extra,named', [
    ({'args': argparse.Namespace(lr=1e-3)}, r"'args' \(argparse\.Namespace\)"),
    ({'evil': 'RUNS_A_COMMAND'}, r"'evil' \(posix\.system\)"),
    ({'optimizer': {'state': {0: {'step': np.float64(3)}}}},
     r"'optimizer/state/0/step' \(numpy\.[\w.]+\)"),
])
def test_a_pth_holding_more_than_tensors_names_the_entry_and_runs_nothing(
    zip_format, extra, named, tmp_path):
  """As the MAE reference's training checkpoints do ({'model', 'optimizer', 'epoch', 'args'}):
  the entry and its type named, torch's own words (which read like advice to load it with
  weights_only=False) never quoted; the file's code never run."""
  marker = tmp_path / 'ran'
  if extra.get('evil') == 'RUNS_A_COMMAND':
    extra = {'evil': _RunsACommand(marker)}
  path = str(tmp_path / 'checkpoint.pth')
  torch.save({'model': {'w': torch.ones(2)}, 'epoch': 3, **extra}, path,
             _use_new_zipfile_serialization=zip_format)
  for run in (lambda: weight_files.read_pytorch(path),
              lambda: public_checkpoints.check_public_checkpoint(path)):
    message = _one_line_error(DamagedFileError, f'{path} holds objects other than tensors: '
                              f'{named}\\. This reads tensors only', run)  # that entry alone
    assert 'weights_only' not in message
  assert not marker.exists()


def test_a_pickled_whole_object_is_named_as_the_whole_file(tmp_path):
  path = str(tmp_path / 'model.pth')
  torch.save(argparse.Namespace(weights=torch.ones(2)), path)
  _one_line_error(DamagedFileError, r'holds objects other than tensors: the whole file '
                  r'\(argparse\.Namespace\)', lambda: weight_files.read_pytorch(path))


def test_a_cut_pth_is_named_without_quoting_torch(tmp_path):
  path = tmp_path / 'cut.pth'
  _write_zip_pth(str(path))
  path.write_bytes(path.read_bytes()[:300])
  for run in (lambda: weight_files.read_pytorch(str(path)),
              lambda: public_checkpoints.check_public_checkpoint(str(path))):
    _one_line_error(DamagedFileError, r'bytes are a zip archive cut short \(the list of its '
                    r'members, at its end, is missing\): download or export it again', run)


def _write_pth_state(path, state):
  torch.save({name: torch.from_numpy(value) for name, value in state.items()}, path)


def _write_npz_state(path, state):
  np.savez(path, **state)


@pytest.mark.parametrize('suffix,write', [('.safetensors', weight_files.write_safetensors),
                                          ('.pth', _write_pth_state),
                                          ('.npz', _write_npz_state)])
def test_non_finite_weights_are_named_with_how_many(suffix, write, tmp_path):
  """A NaN in imported weights is named where it is, not found as a NaN loss at step 1."""
  state = dict(_TIMM_STATE, **{'blocks.0.attn.qkv.weight': np.ones((12, 4), np.float32)})
  state['blocks.0.attn.qkv.weight'][3, :3] = np.nan
  state['blocks.0.attn.qkv.weight'][5, 0] = -np.inf
  path = str(tmp_path / f'weights{suffix}')
  write(path, state)
  _one_line_error(NonFiniteWeightsError,
                  f"{path}: 'blocks.0.attn.qkv.weight' holds 3 NaN and 1 Inf values of 48, "
                  'which would make the first loss NaN',
                  lambda: public_checkpoints.read_state(path))


def test_check_finite_names_the_path_in_a_tree_and_skips_integers():
  tree = {'encoder': {'norm': {'scale': np.ones(3, np.float32)},
                      'kernel': np.array([1.0, np.inf], np.float32)},
          'head': {'bias': np.array([np.nan, np.nan], np.float64)},
          'steps': np.array([1, 2], np.int32)}
  _one_line_error(NonFiniteWeightsError, r"^step_dir: 'encoder/kernel' holds 0 NaN and 1 Inf "
                  r'values of 2 \(and 1 more arrays have some\)',
                  lambda: weight_files.check_finite(tree, 'step_dir'))
  weight_files.check_finite({'a': np.zeros(2, np.float32), 'b': np.array([-1])}, 'fine')


@pytest.mark.parametrize('state,layout', [(_TIMM_STATE, 'timm'), (_HF_STATE, 'hf')])
def test_a_folder_without_config_json_is_read_as_its_safetensors_file(state, layout, tmp_path,
                                                                      caplog):
  """A Hugging Face folder whose config.json was not copied: its weights, told apart by
  their names (not an Orbax checkpoint, which would fail with a long traceback)."""
  folder = str(tmp_path / 'model')
  weight_files.write_safetensors(os.path.join(folder, weight_files.SAFETENSORS_FILE), state)
  assert public_checkpoints.is_public_checkpoint(folder)
  public_checkpoints.check_public_checkpoint(folder)
  with caplog.at_level(logging.INFO):
    read_layout, read = public_checkpoints.read_state(folder)
  assert read_layout == layout and sorted(read) == sorted(state)
  assert f'{folder} has no config.json' in caplog.text


def _sharded_folder(folder, shards_written):
  """A two-shard folder with its index; only `shards_written` of its shards are there."""
  os.makedirs(folder)
  names = {'model-00001-of-00002.safetensors': dict(list(_TIMM_STATE.items())[:1]),
           'model-00002-of-00002.safetensors': dict(list(_TIMM_STATE.items())[1:])}
  weight_map = {tensor: shard for shard, state in names.items() for tensor in state}
  with open(os.path.join(folder, weight_files.SAFETENSORS_INDEX_FILE), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  for shard in list(names)[:shards_written]:
    weight_files.write_safetensors(os.path.join(folder, shard), names[shard])
  return folder


def test_a_sharded_folder_reads_and_a_missing_shard_is_named(tmp_path):
  whole = _sharded_folder(str(tmp_path / 'whole'), shards_written=2)
  public_checkpoints.check_public_checkpoint(whole)
  assert sorted(public_checkpoints.read_state(whole)[1]) == sorted(_TIMM_STATE)
  partial = _sharded_folder(str(tmp_path / 'partial'), shards_written=1)
  for run in (lambda: public_checkpoints.read_state(partial),
              lambda: public_checkpoints.check_public_checkpoint(partial)):
    _one_line_error(CheckpointUnreadableError, r"model.safetensors.index.json lists the shard "
                    r"'model-00002-of-00002.safetensors', which is not in .*partial \(1 of its "
                    r'2 shards are missing\)', run)


def test_a_model_folder_without_its_weights_is_named_in_one_line(tmp_path):
  """Hugging Face folders of .bin weights, or whose weights were never copied."""
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps({'model_type': 'vit'}))
  assert public_checkpoints.is_public_checkpoint(str(folder))
  for run in (lambda: public_checkpoints.read_state(str(folder)),
              lambda: public_checkpoints.check_public_checkpoint(str(folder))):
    _one_line_error(CheckpointUnreadableError, r'holds no model.safetensors .*copy them into '
                    r'it, or point init_from.checkpoint at the weights file itself', run)
  _write_zip_pth(str(folder / 'pytorch_model.bin'))
  _one_line_error(CheckpointUnreadableError, r'it has pytorch_model.bin: point '
                  r'init_from.checkpoint at that file itself',
                  lambda: public_checkpoints.read_state(str(folder)))


def test_a_stage_folder_is_left_to_the_orbax_reader(tmp_path):
  """A stage's folder also holds a config.json (the run's), and checkpoints/ of Orbax steps."""
  stage = tmp_path / 'mae'
  (stage / 'checkpoints' / '100').mkdir(parents=True)
  (stage / 'config.json').write_text(json.dumps({'model': {'variant': 'mu/8'}}))
  assert not public_checkpoints.is_public_checkpoint(str(stage))
  public_checkpoints.check_public_checkpoint(str(stage))  # nothing here to check


def test_missing_or_damaged_json_and_a_missing_path_are_one_line(tmp_path):
  config_file = str(tmp_path / 'config.json')
  _one_line_error(CheckpointUnreadableError, r'config.json is missing: copy it from the model',
                  lambda: weight_files.read_json_file(config_file))
  with open(config_file, 'w') as f:
    f.write('{"model_type": "vit",')
  _one_line_error(DamagedFileError, r'config.json cannot be read \(JSONDecodeError: .*Restore it',
                  lambda: weight_files.read_json_file(config_file))
  (tmp_path / 'model.safetensors').write_bytes(_safetensors_bytes({}, b''))
  _one_line_error(DamagedFileError, r'config.json cannot be read',
                  lambda: public_checkpoints.check_public_checkpoint(str(tmp_path)))
  missing = str(tmp_path / 'mae_pretrain_vit_base.pth')
  for run in (lambda: public_checkpoints.read_state(missing),
              lambda: public_checkpoints.check_public_checkpoint(missing)):
    _one_line_error(CheckpointUnreadableError, r'mae_pretrain_vit_base.pth does not exist', run)


def test_the_cheap_check_passes_every_readable_format(tmp_path):
  for name, write in (('a.safetensors', _write_safetensors), ('a.pth', _write_zip_pth),
                      ('a.npz', _write_npz)):
    write(str(tmp_path / name))
    public_checkpoints.check_public_checkpoint(str(tmp_path / name))
  legacy = str(tmp_path / 'legacy.pth')
  torch.save({'model': {'w': torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
  public_checkpoints.check_public_checkpoint(legacy)
  assert sorted(weight_files.read_pytorch(legacy)) == ['w']


def test_the_same_weights_and_metadata_give_the_same_safetensors_bytes_every_time():
  """The safetensors writer keeps metadata in a hash map (another order at each call); the
  file we write sorts it, so an export's bytes and digest do not change from run to run."""
  tensors = {'b': np.arange(3, dtype=np.float32), 'a': np.ones((2, 2), np.float16)}
  metadata = {'big_pretrain_export': '{"stage": "wsp", "note": "é"}', 'zeta': '1', 'alpha': '2'}
  written = {weight_files.safetensors_bytes(tensors, metadata) for _ in range(20)}
  assert len(written) == 1
  (data,) = written
  length = struct.unpack('<Q', data[:8])[0]
  header = json.loads(data[8:8 + length])
  assert list(header['__metadata__']) == ['alpha', 'big_pretrain_export', 'format', 'zeta']
  assert header['__metadata__']['big_pretrain_export'] == metadata['big_pretrain_export']
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  loaded = load(data)
  assert all(np.array_equal(loaded[name], value) for name, value in tensors.items())
