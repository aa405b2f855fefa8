"""Two real processes on 127.0.0.1 (jax.distributed, CPU collectives) against one.

Each launch starts tests/multiprocess_worker.py twice with 2 CPU devices each; what one
process reads is read in this process on 4 of its 8 devices, with the same (data=2,
fsdp=2) mesh and global batch. (Training on another process count, exactly:
test_elastic_resume.py.)
"""

import glob
import json
import os

import jax
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.data.train_input import InputPipeline
from helpers.batches import eval_split_batches
from helpers.hashes import image_hashes
from helpers.jax_workers import DEVICES_PER_PROCESS, NUM_PROCESSES, launch_workers
from helpers.tiny_config import tiny_multiprocess_config

pytestmark = pytest.mark.multiprocess  # the test tiers: pytest.ini


@pytest.fixture(scope='module')
def four_devices():
  return jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]


def test_each_process_reads_its_rows_of_the_single_process_batches(tmp_path, four_devices):
  workers = launch_workers('data', str(tmp_path))
  assert [w['process_count'] for w in workers] == [2, 2]
  assert [w['device_count'] for w in workers] == [4, 4]

  config = tiny_multiprocess_config()
  mesh = sharding_lib.make_mesh(config.mesh, four_devices)
  train = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                        seed=config.seed)
  for step, worker_rows in enumerate(zip(*(w['train_rows'] for w in workers))):
    single = image_hashes(train.next_local_numpy()['image'])
    # Process 0 holds the first half of every global batch, process 1 the second.
    assert worker_rows[0] + worker_rows[1] == single, f'train batch {step}'

  eval_data = config.data.copy_and_resolve_references()
  eval_data.split = 'test'
  single_eval = [image_hashes(batch['image'])
                 for batch in eval_split_batches(eval_data, config.batch_size)]
  # 64 examples, global batch 8: 8 batches each, none left over for one process alone.
  assert len(workers[0]['eval_rows']) == len(workers[1]['eval_rows']) == len(single_eval) == 8
  rows = [set(sum(w['eval_rows'], [])) for w in workers]
  assert not rows[0] & rows[1], 'the processes read overlapping examples'
  assert rows[0] | rows[1] == set(sum(single_eval, []))


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """Two processes train 2 steps and stop; two new ones resume to step 4."""
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  stopped = launch_workers('train', workdir)
  resumed = launch_workers('resume', workdir)
  return workdir, stopped, resumed


def test_two_processes_train_and_resume(two_process_run):
  # That they train exactly as one process does, and resume on another count, is
  # test_elastic_resume's; here the run the tests below read.
  _, stopped, resumed = two_process_run
  assert [w['final_step'] for w in stopped] == [2, 2]
  assert [w['final_step'] for w in resumed] == [4, 4]
  # The metrics are global: both processes log the same losses.
  assert stopped[0]['losses'] == stopped[1]['losses']
  assert resumed[0]['losses'] == resumed[1]['losses']
  losses = [loss for w in (stopped[0], resumed[0]) for loss in w['losses'].values()]
  assert len(losses) == 4 and losses[0] != losses[-1]


def test_a_rerun_runs_missing_final_evaluations_on_every_process_as_process_0_says(
    two_process_run):
  # Process 1 believes the scores are recorded; it follows process 0 (which knows they
  # are not) into the evaluator's collectives instead of leaving it waiting there.
  workdir, _, resumed = two_process_run
  assert [w['rerun'] for w in resumed] == [{'steps_run': 0, 'evaluated': ['reconstruction']}] * 2
  with open(os.path.join(workdir, 'stage', 'eval_results.json')) as f:
    assert json.load(f)['step'] == 4


def test_only_process_zero_writes_logs(two_process_run):
  workdir, stopped, resumed = two_process_run
  events = sorted(glob.glob(os.path.join(workdir, 'stage', 'events.out.tfevents.*')))
  # One events file per stage run (the resumed launch's rerun adds one), each named
  # after process 0's pid.
  assert len(events) == 3, events
  assert {int(path.split('.')[-2]) for path in events} == {stopped[0]['pid'], resumed[0]['pid']}
  assert os.path.exists(os.path.join(workdir, 'stage', 'config.json'))


def test_a_ctrl_c_on_one_process_stops_both_at_the_same_saved_step(tmp_path):
  # Process 1 alone gets SIGINT, which it hands to JAX's preemption sync as the SIGTERM
  # a preempted host gets: so this covers both.
  workers = launch_workers('preempt', str(tmp_path))
  steps = [w['final_step'] for w in workers]
  assert all(w['preempted'] for w in workers)
  # JAX's preemption sync point: both stop together, soon after the notice.
  assert steps[0] == steps[1] and 3 <= steps[0] < 100
  saved = sorted(int(p.name) for p in (tmp_path / 'preempt' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert saved[-1] == steps[0]

  # The preempted run resumes on 1 process x 4 devices, with the global batches it would
  # have trained on next (its input, read here on one process, says which).
  os.makedirs(tmp_path / 'resumed')
  resumed = launch_workers('elastic', str(tmp_path / 'resumed'), num_processes=1,
                           devices_per_process=4, env={'ELASTIC_SPEC': json.dumps(
                               {'stage': str(tmp_path / 'preempt'), 'total_steps': 100,
                                'stop_after': 2})})[0]
  assert (resumed['start_step'], resumed['final_step']) == (steps[0], steps[0] + 2)
  config = tiny_multiprocess_config()
  data = InputPipeline(config.data, global_batch_size=config.batch_size,
                       mesh=sharding_lib.make_mesh(config.mesh, jax.devices()[:4]),
                       seed=config.seed)
  for _ in range(steps[0]):
    data.next_local_numpy()
  assert resumed['keys'] == [image_hashes(data.next_local_numpy()['image']) for _ in range(2)]
  with open(tmp_path / 'preempt' / 'config_history.jsonl') as f:
    assert json.loads(f.readlines()[-1])['topology_change'] == (
        '2 processes x 2 devices -> 1 process x 4 devices')
