"""Resuming on another number of processes and devices, exactly.

The data position is global (data/batch_columns.py): which example, with which crop and
flip, lands in which row of which global batch depends on the stream alone, also when
unreadable images are skipped, so a checkpoint written by P processes continues the same
global batches on P'. The in-process tests check the reader with simulated process
indices; the multi-process ones train for real, on 127.0.0.1 with gloo collectives, and
compare with an uninterrupted run:

  2 processes x 2 devices -> 1 process x 4 devices, and back: the same example keys (image
  hashes) at every step, and the final train state bit for bit. Every worker, also a single
  one, sums across devices with gloo: with XLA's in-process CPU collectives instead, a
  1-process run differs from a 2-process one in the order of the 4-way gradient sums, by
  ||dθ|| / ||θ|| = 4e-8 after 10 steps (the float32 rounding of a reordered sum); with the
  same collectives on both sides the order is the same and so are the bits.
  1 process x 2 devices -> 2 processes x 2 devices (a mesh twice the size): the same keys;
  the state within the rounding of summing gradients over 4 devices instead of 2.
"""

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from big_pretrain.data import train_input
from big_pretrain.data.batch_columns import GlobalPosition
from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.storage import checksums
from big_pretrain.train.loop import train_stage
from helpers.batches import first_devices_mesh, small_data_config
from helpers.hashes import image_hashes
from helpers.batches import IMAGE_SIZE
from helpers.jax_workers import launch_workers
from helpers.tiny_config import tiny_mae_config

from PIL import Image

GLOBAL_BATCH = 4


# --- The reader, with simulated processes ----------------------------------------------

def _folder_with_unreadable_images(root):
  """12 readable PNGs and 4 garbage .jpg files in two class folders."""
  rng = np.random.default_rng(0)
  for class_name in ('cats', 'dogs'):
    (root / class_name).mkdir(parents=True)
    for i in range(6):
      pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / class_name / f'{class_name}{i}.png')
    for i in range(2):
      (root / class_name / f'broken{i}.jpg').write_bytes(rng.bytes(300))
  return root


@contextlib.contextmanager
def _as_process(monkeypatch, index: int, count: int):
  with monkeypatch.context() as patch:
    patch.setattr(jax, 'process_index', lambda: index)
    patch.setattr(jax, 'process_count', lambda: count)
    yield


def _pipelines(monkeypatch, config, count: int) -> list[train_input.InputPipeline]:
  """The input of each process of a `count`-process run (built here, one after another)."""
  pipelines = []
  for index in range(count):
    with _as_process(monkeypatch, index, count):
      pipelines.append(train_input.InputPipeline(
          config, global_batch_size=GLOBAL_BATCH, mesh=first_devices_mesh(), seed=2))
  return pipelines


def _global_batches(pipelines, num_batches: int) -> list[list[str]]:
  """The image hashes of each global batch: every process's rows, in process order."""
  return [sum((image_hashes(p.next_local_numpy()['image']) for p in pipelines), [])
          for _ in range(num_batches)]


def _saved(pipelines) -> dict:
  """The global position of `pipelines` as a checkpoint stores it (JSON)."""
  position = GlobalPosition.merged(GLOBAL_BATCH,
                                   [p.local_batches.get_state() for p in pipelines])
  return json.loads(json.dumps(position.to_json()))


def test_the_global_batches_are_the_same_on_any_process_count_also_past_unreadable_images(
    tmp_path, monkeypatch):
  config = small_data_config(source='image_folder',
                             path=str(_folder_with_unreadable_images(tmp_path / 'images')))
  one = _pipelines(monkeypatch, config, 1)
  expected = _global_batches(one, 9)  # 36 rows: 3 epochs of 12 readable images
  assert one[0].corrupt_images_skipped >= 8
  for count in (2, 4):
    assert _global_batches(_pipelines(monkeypatch, config, count), 9) == expected, count

  # Saved by 2 processes after 4 batches; resumed by 1, and by 4.
  two = _pipelines(monkeypatch, config, 2)
  _global_batches(two, 4)
  saved = _saved(two)
  assert saved['batches'] == 4
  assert saved['corrupt_images_skipped'] == sum(p.corrupt_images_skipped for p in two) > 0
  for count in (1, 4):
    resumed = _pipelines(monkeypatch, config, count)
    for pipeline in resumed:
      pipeline.local_batches.set_state(saved)
    assert _global_batches(resumed, 5) == expected[4:], count
    assert sum(p.corrupt_images_skipped for p in resumed) >= saved['corrupt_images_skipped']
    # Every unreadable image is skipped in its own column: the totals match the one run's.
    assert _saved(resumed)['corrupt_images_skipped'] == _saved(one)['corrupt_images_skipped']


def test_a_position_of_another_global_batch_size_is_refused(monkeypatch):
  config = small_data_config()
  pipeline = _pipelines(monkeypatch, config, 1)[0]
  saved = {**GlobalPosition(GLOBAL_BATCH * 2, 3, {}).to_json()}
  with pytest.raises(CheckpointMismatchError, match='global batches of 8 rows; this run has 4'):
    pipeline.local_batches.set_state(saved)


# --- A checkpoint written before global positions ---------------------------------------

def _as_if_written_before_global_positions(step_dir, rows_per_process: int,
                                           process_count: int = 1) -> None:
  """Rewrites a step as a version before global positions saved it: one Grain state per
  process in data/process_<i>-of-<P>.json (elements read of its rows, skips), its digest
  per process, and the item in the step's Orbax metadata."""
  position = json.loads((step_dir / 'data_position' / 'data_position.json').read_text())
  shutil.rmtree(step_dir / 'data_position')
  (step_dir / 'data').mkdir()
  digests = {}
  for process in range(process_count):
    state = {'parent': {'next_index': position['batches'] * rows_per_process},
             'corrupt_images_skipped': 0, 'corrupt_records_skipped': 0}
    text = json.dumps(state, indent=4)
    (step_dir / 'data' / f'process_{process}-of-{process_count}.json').write_text(text)
    digests[str(process)] = checksums.bytes_digest(text.encode())
  record_file = step_dir / 'digests' / 'digests.json'
  record = json.loads(record_file.read_text())
  del record['data_position']
  record['data_iterator'] = digests
  record_file.write_text(json.dumps(record))
  metadata_file = step_dir / '_CHECKPOINT_METADATA'
  metadata = json.loads(metadata_file.read_text())
  handlers = metadata['item_handlers']
  handlers['data'] = handlers.pop('data_position').replace(
      'orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler',
      'grain._src.python.checkpoint.handler.CheckpointHandler')
  metadata_file.write_text(json.dumps(metadata))


def _example_keys(workdir) -> dict[int, list[str]]:
  """{batch: keys} of every record in the stage's example_keys/ (the last one per batch)."""
  records = {}
  for path in sorted((workdir / 'example_keys').iterdir()):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      records[record['batch']] = record['keys']
  return records


@pytest.mark.integration
def test_a_checkpoint_from_before_global_positions_resumes_on_its_process_count_only(
    tmp_path):
  config = tiny_mae_config(total_steps=4, **{'log.example_keys': True})
  workdir = tmp_path / 'old'
  train_stage(config, str(workdir), stop_after_steps=2)
  # The batches of steps 3 and 4, as this run read them ahead (device_prefetch=2).
  read_ahead = _example_keys(workdir)
  assert {2, 3} <= set(read_ahead)
  _as_if_written_before_global_positions(workdir / 'checkpoints' / '2', config.batch_size)
  shutil.copytree(workdir, tmp_path / 'old_two_processes')
  shutil.rmtree(workdir / 'example_keys')

  resumed = train_stage(config, str(workdir))
  assert resumed.steps_run == 2
  resumed_keys = _example_keys(workdir)
  assert [resumed_keys[2], resumed_keys[3]] == [read_ahead[2], read_ahead[3]]

  # The same step, as 2 processes would have written it: this run has 1.
  two_dir = tmp_path / 'old_two_processes' / 'checkpoints' / '2' / 'data'
  for path in two_dir.iterdir():
    path.unlink()
  for process in range(2):
    (two_dir / f'process_{process}-of-2.json').write_text('{}')
  with pytest.raises(CheckpointMismatchError) as refused:
    train_stage(config, str(tmp_path / 'old_two_processes'))
  message = str(refused.value)
  assert '\n' not in message
  assert ('was written by 2 processes with a version of big_pretrain that saved each '
          "process's data position on its own, so it resumes only on 2 processes (this run "
          'has 1 process)') in message


# --- Real processes -------------------------------------------------------------------

ONE_BY_FOUR = {'num_processes': 1, 'devices_per_process': 4}
TWO_BY_TWO = {'num_processes': 2, 'devices_per_process': 2}
ONE_BY_TWO = {'num_processes': 1, 'devices_per_process': 2}
# The tiny MAE stage over whatever devices there are (data parallel): 2 or 4.
DATA_PARALLEL = {'data': -1, 'fsdp': 1, 'tensor': 1}


def _train(launch_dir, stage_dir, shape: dict, **spec) -> dict:
  """Trains the tiny stage in `stage_dir` on `shape` processes x devices; returns the keys
  of every step it trained (every process's rows, in process order), its first step and
  its final state."""
  os.makedirs(launch_dir)
  results = launch_workers('elastic', str(launch_dir), **shape, env={
      'ELASTIC_SPEC': json.dumps({'stage': str(stage_dir), **spec})})
  steps = len(results[0]['keys'])
  assert all(len(r['keys']) == steps for r in results)
  with np.load(os.path.join(launch_dir, f'{os.path.basename(stage_dir)}_state.npz')) as state:
    arrays = dict(state)
  return {'start_step': results[0]['start_step'], 'state': arrays,
          'keys': [sum((r['keys'][step] for r in results), []) for step in range(steps)]}


def _history(stage_dir) -> list[dict]:
  with open(os.path.join(stage_dir, 'config_history.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_same_states(expected: dict, got: dict) -> None:
  assert expected.keys() == got.keys()
  different = [name for name in expected if not np.array_equal(expected[name], got[name])]
  assert not different, f'{len(different)} arrays differ, e.g. {different[:3]}'


@pytest.mark.multiprocess
def test_a_run_resumed_on_another_process_count_and_back_trains_exactly_as_one_that_never_stopped(
    tmp_path):
  reference = _train(tmp_path / 'uninterrupted', tmp_path / 'reference', ONE_BY_FOUR,
                     total_steps=6)
  stage = tmp_path / 'stage'
  segments = [_train(tmp_path / 'first', stage, TWO_BY_TWO, total_steps=6, stop_after=2),
              _train(tmp_path / 'second', stage, ONE_BY_FOUR, total_steps=6, stop_after=2),
              _train(tmp_path / 'third', stage, TWO_BY_TWO, total_steps=6)]
  assert [segment['start_step'] for segment in segments] == [0, 2, 4]
  assert sum((segment['keys'] for segment in segments), []) == reference['keys']
  assert len(set(sum(reference['keys'], []))) == 6 * 8  # 48 distinct crops of 48 examples
  _assert_same_states(reference['state'], segments[-1]['state'])
  assert [start.get('topology_change') for start in _history(stage)] == [
      None, '2 processes x 2 devices -> 1 process x 4 devices',
      '1 process x 4 devices -> 2 processes x 2 devices']


@pytest.mark.integration
def test_a_run_resumed_on_a_mesh_twice_the_size_trains_on_the_same_examples(tmp_path):
  reference = _train(tmp_path / 'uninterrupted', tmp_path / 'reference', ONE_BY_TWO,
                     mesh=DATA_PARALLEL)
  stage = tmp_path / 'stage'
  stopped = _train(tmp_path / 'first', stage, ONE_BY_TWO, mesh=DATA_PARALLEL, stop_after=2)
  resumed = _train(tmp_path / 'then', stage, TWO_BY_TWO, mesh=DATA_PARALLEL)
  assert stopped['keys'] + resumed['keys'] == reference['keys']
  assert _history(stage)[-1]['topology_change'] == (
      '1 process x 2 devices -> 2 processes x 2 devices (mesh data=2, fsdp=1, tensor=1 -> '
      'data=4, fsdp=1, tensor=1)')
  # Two steps' gradients summed over 4 devices instead of 2: float32 sums in another order,
  # each rounded within eps = 1.2e-7 of its size. Adam divides each update by the gradient's
  # own scale, so where the true gradient is ~0 (attention key biases) the rounding noise
  # moves a parameter by up to the learning rate: measured ||dθ|| / ||θ|| = 4.2e-8 here
  # (the same on every run of this CPU). The two resumed steps themselves move the
  # parameters by 3.0e-4 of their norm, so a step on other examples would show at about that
  # size; the bound, 1e-6 (about 8 eps, 24x the measured), separates the two by 300x.
  params = [name for name in reference['state'] if name.startswith('.params')]
  diff = np.sqrt(sum(np.sum((reference['state'][n] - resumed['state'][n]) ** 2) for n in params))
  norm = np.sqrt(sum(np.sum(reference['state'][n] ** 2) for n in params))
  moved = np.sqrt(sum(np.sum((stopped['state'][n] - resumed['state'][n]) ** 2) for n in params))
  assert diff / norm < 1e-6, diff / norm
  assert moved / norm > 1e-4, moved / norm  # the steps did train
