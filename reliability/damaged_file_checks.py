"""The damaged-file checks of reliability/bad_inputs.py: files a run reads from its workdir or a
data path, cut short or garbled as a full disk, an unfinished copy or a hand edit leaves them.

A file the run can rebuild (evaluation results, the config history) must be set aside as
*.damaged, kept, and rebuilt; any other must be named in one line with what to do, and the
run must change nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Callable

from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
from big_pretrain.errors import EXIT_NO_BACKEND, EXIT_STOPPED, EXIT_USAGE
from reliability.bad_input_checks import (
    BASE_TOTAL_STEPS, CARRY_ON, EXIT_OK, REFUSE, Context, Observed, changes_between,
    cut_in_half)

# A converted ArrayRecord folder written by the converter of an earlier version (3 images).
CONVERTED_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests', 'data', 'shards_written_with_tensorflow')


def damaged_eval_results(ctx: Context) -> Observed:
  """The finished 4-step workdir, now with a reconstruction evaluator whose recorded results
  were cut short: the same command sets them aside and evaluates the final checkpoint again."""
  workdir = ctx.trained_copy()
  results = os.path.join(workdir, 'eval_results.json')
  with open(results, 'w', encoding='utf-8') as f:
    f.write('{"step": 4, "reconstruction": {"mse": 0.1')
  run = ctx.main(ctx.tiny('recon'), f'--workdir={workdir}',
                 f'--config.total_steps={BASE_TOTAL_STEPS}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), 'Set aside as eval_results.json.damaged')
  if not os.path.exists(results + '.damaged'):
    observed.lost.append('eval_results.json.damaged not kept')
  try:
    with open(results, encoding='utf-8') as f:
      rebuilt = json.load(f)
  except (OSError, ValueError):
    rebuilt = {}
  if rebuilt.get('step') != BASE_TOTAL_STEPS or 'reconstruction' not in rebuilt:
    observed.problems.append('eval_results.json not written again')
  return observed


def damaged_config_history(ctx: Context) -> Observed:
  """The 4-step workdir with config_history.jsonl cut short, resumed to 6 steps: the history
  is set aside, a new one started."""
  workdir = ctx.trained_copy()
  history = os.path.join(workdir, 'config_history.jsonl')
  cut_in_half(history)
  run = ctx.main(ctx.tiny(), f'--workdir={workdir}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), 'config_history.jsonl cannot be read')
  if not os.path.exists(history + '.damaged'):
    observed.lost.append('config_history.jsonl.damaged not kept')
  return observed


def refused_data_file(ctx: Context, damaged: 'DamagedDataFile') -> Observed:
  """A new run given a damaged data file (made in the case's folder): refused in one line, the
  file unchanged."""
  overrides = damaged.damage(ctx.folder)
  data = os.path.join(ctx.folder, 'data')
  before = fingerprint_tree(data)
  run = ctx.main(ctx.tiny(), ctx.fresh(), *(f'--config.{key}={value}'
                                            for key, value in overrides.items()))
  exit_codes = (EXIT_STOPPED,) if damaged.found_when == READING else (EXIT_USAGE,)
  return Observed(run, REFUSE, exit_codes, damaged.evidence,
                  lost=changes_between(before, fingerprint_tree(data)))


def fingerprint_tree(folder: str) -> dict[str, str]:
  """Relative path -> content hash of every file under `folder`."""
  prints = {}
  for root, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        prints[os.path.relpath(os.path.join(root, name), folder)] = (
            hashlib.sha1(f.read()).hexdigest())
  return prints


# --- The damaged data files: one list, checked in process by tests/test_damaged_files.py and
# end to end (main.py, exit code, files unchanged) by the bad-inputs table.

VALIDATING = 'validating'  # refused by config validation, before anything compiles
READING = 'reading'  # found when the stage reads its data, after compiling


@dataclasses.dataclass(frozen=True)
class DamagedDataFile:
  """A file a user points a run at, damaged as a full disk, an unfinished copy or a hand edit
  leaves it; `damage(folder)` writes it under folder/data and returns the config overrides
  ({'a.b': value}) that read it; `evidence` is a regex of the one-line refusal."""
  name: str
  done: str
  damage: Callable[[str], dict]
  evidence: str
  found_when: str = VALIDATING


def converted_folder(damage: Callable[[str], None]) -> Callable[[str], dict]:
  """A copy of the converted folder with one of its files damaged, read as array_record."""
  def make(folder: str) -> dict:
    data = os.path.join(folder, 'data')
    shutil.copytree(CONVERTED_FOLDER, data)
    damage(data)
    return {'data.source': 'array_record', 'data.path': data, 'batch_size': 8}
  return make


def text_file(name: str, content: bytes, key: str) -> Callable[[str], dict]:
  """`content` written as data/`name`, given as config key `key`."""
  def make(folder: str) -> dict:
    path = os.path.join(folder, 'data', name)
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:
      f.write(content)
    return {key: path}
  return make


def _shipped_tokenizer_cut_short(folder: str) -> dict:
  """The synthetic tokenizer cut in half (its last word cut too), as a copy that stopped."""
  with open(synthetic_tokenizer_path(), 'rb') as f:
    whole = f.read()
  return text_file('tokenizer.txt', whole[:len(whole) // 2] + b'\n\n',
                   'data.text.tokenizer')(folder)


SHARD = 'train-00000-of-00001.array_record'
DAMAGED_DATA_FILES = (
    DamagedDataFile('shard_truncated', 'train on a converted folder whose ArrayRecord shard is '
                    'cut in half',
                    converted_folder(lambda data: cut_in_half(os.path.join(data, SHARD))),
                    'is not a whole ArrayRecord file.*Copy it again from where it was converted',
                    found_when=READING),
    DamagedDataFile('converter_metadata_truncated', "the converted folder's metadata.json cut "
                    'in half', converted_folder(
                        lambda data: cut_in_half(os.path.join(data, 'metadata.json'))),
                    r'metadata\.json cannot be read'),
    DamagedDataFile('converter_metadata_not_utf8', "the converted folder's metadata.json a "
                    'binary file', converted_folder(
                        lambda data: _write(os.path.join(data, 'metadata.json'), b'\xff')),
                    r'metadata\.json cannot be read'),
    DamagedDataFile('vocabulary_empty', '`--config.data.labels.vocabulary=` an empty file',
                    text_file('vocab.txt', b'', 'data.labels.vocabulary'), 'has no labels'),
    DamagedDataFile('vocabulary_not_utf8', '`--config.data.labels.vocabulary=` a binary file',
                    text_file('vocab.txt', b'\xff\xfe\x00\x81', 'data.labels.vocabulary'),
                    'is not UTF-8'),
    DamagedDataFile('vocabulary_duplicate_label', 'a label vocabulary with a label twice',
                    text_file('vocab.txt', b'circle\nsquare\ncircle\n', 'data.labels.vocabulary'),
                    'already defined at line 1'),
    DamagedDataFile('tokenizer_empty', '`--config.data.text.tokenizer=` an empty file (a copy '
                    'that did not start)', text_file('tokenizer.txt', b'', 'data.text.tokenizer'),
                    'a word vocabulary starts with'),
    DamagedDataFile('tokenizer_cut_short', '`--config.data.text.tokenizer=` the shipped '
                    'tokenizer cut in half', _shipped_tokenizer_cut_short,
                    '(?i)tokenizer file'),
)


def _write(path: str, content: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(content)


# --- The third ring: bytes altered in place, and a backend that does not start.


def _orbax_reads(checkpoint: str) -> bool:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  try:
    ocp.PyTreeCheckpointer().restore(os.path.join(checkpoint, 'state'))
  except Exception:  # noqa: BLE001  (any failure: the damage shows without digests)
    return False
  return True


def flip_a_bit_that_still_decodes(checkpoint: str) -> None:
  """One bit of the largest array file of `checkpoint` flipped where its compressed data still
  decodes (to other numbers): the damage a disk fault leaves that nothing but a digest sees."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(checkpoint, 'state'))
           if os.path.basename(root) == 'd' for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'rb') as f:
    original = f.read()
  for offset in range(len(original) // 2, len(original) - 8, 97):
    data = bytearray(original)
    data[offset] ^= 0x10
    with open(largest, 'wb') as f:
      f.write(bytes(data))
    if _orbax_reads(checkpoint):
      return
  raise RuntimeError(f'no bit of {largest} flips and still decodes')


def _damage_a_block_of_records(data: str) -> None:
  """Zeroes bytes inside the shard's records (not its index: it still opens) until one record
  fails its hash."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  shard = os.path.join(data, 'train-00000-of-00001.array_record')
  with open(shard, 'rb') as f:
    original = f.read()
  for offset in range(64, len(original) - 16, 61):
    damaged = bytearray(original)
    damaged[offset:offset + 8] = bytes(8)
    with open(shard, 'wb') as f:
      f.write(bytes(damaged))
    try:
      reader = array_record_module.ArrayRecordReader(shard)
    except RuntimeError:
      continue
    bad = 0
    for index in range(reader.num_records()):
      try:
        reader.read([index])
      except RuntimeError:
        bad += 1
    reader.close()
    if bad:
      return
  raise RuntimeError(f'no damage of {shard} that still opens')


def damaged_block_mid_shard(folder: str) -> list[str]:
  """The command-line overrides of a converted folder whose shard has a block damaged."""
  return [f'--config.{key}={value}'
          for key, value in converted_folder(_damage_a_block_of_records)(folder).items()]


def backend_cannot_start(ctx: Context) -> Observed:
  """JAX_PLATFORMS=tpu on a machine without a TPU (or without libtpu)."""
  run = ctx.main(ctx.tiny(), ctx.fresh(), env_overrides={'JAX_PLATFORMS': 'tpu'})
  observed = Observed(run, REFUSE, (EXIT_NO_BACKEND,), 'JAX could not start its backend')
  if os.path.exists(os.path.join(ctx.folder, 'fresh')):
    observed.lost.append('the workdir was created')
  return observed
