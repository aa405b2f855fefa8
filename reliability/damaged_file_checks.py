"""The damaged-file checks of reliability/bad_inputs.py: files a run reads from its workdir or a
data path, cut short or garbled as a full disk, an unfinished copy or a hand edit leaves them.

A file the run can rebuild (evaluation results, the config history) must be set aside as
*.damaged, kept, and rebuilt; any other must be named in one line with what to do, and the
run must change nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

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


def refused_data_file(ctx: Context, damage: Callable[[str], str], *args: str, evidence: str,
                      exit_codes=(EXIT_USAGE,)) -> Observed:
  """A new run given a damaged data file (`damage(folder)` makes it in the case's folder and
  returns the override that points at it): refused in one line, the file unchanged."""
  override = damage(ctx.folder)
  data = os.path.join(ctx.folder, 'data')
  before = fingerprint_tree(data)
  run = ctx.main(ctx.tiny(), ctx.fresh(), *args, override)
  return Observed(run, REFUSE, exit_codes, evidence,
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


def converted_folder(folder: str, damage: Callable[[str], None]) -> str:
  """A copy of the converted folder, one of its files damaged; the override that reads it."""
  data = os.path.join(folder, 'data')
  shutil.copytree(CONVERTED_FOLDER, data)
  damage(data)
  return f'--config.data.path={data}'


def truncated_shard(folder: str) -> str:
  return converted_folder(folder, lambda data: cut_in_half(
      os.path.join(data, 'train-00000-of-00001.array_record')))


def truncated_converter_metadata(folder: str) -> str:
  return converted_folder(folder, lambda data: cut_in_half(os.path.join(data, 'metadata.json')))


def text_file(name: str, content: bytes, key: str) -> Callable[[str], str]:
  """A damage that writes `content` as data/`name`, given as config key `key`."""
  def damage(folder: str) -> str:
    path = os.path.join(folder, 'data', name)
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:
      f.write(content)
    return f'--config.{key}={path}'
  return damage


ARRAY_RECORD = ('--config.data.source=array_record', '--config.batch_size=8')
EXIT_REFUSED_LATE = (EXIT_STOPPED,)  # found once the stage reads its data, after compiling


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


def damaged_block_mid_shard(folder: str) -> str:
  return converted_folder(folder, _damage_a_block_of_records)


def backend_cannot_start(ctx: Context) -> Observed:
  """JAX_PLATFORMS=tpu on a machine without a TPU (or without libtpu)."""
  run = ctx.main(ctx.tiny(), ctx.fresh(), env_overrides={'JAX_PLATFORMS': 'tpu'})
  observed = Observed(run, REFUSE, (EXIT_NO_BACKEND,), 'JAX could not start its backend')
  if os.path.exists(os.path.join(ctx.folder, 'fresh')):
    observed.lost.append('the workdir was created')
  return observed
