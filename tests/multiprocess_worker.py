"""One process of a multi-process run on 127.0.0.1, started by tests/test_multiprocess.py.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR TASK

TASK 'data': writes the image hashes of every row this process loads, for the
train pipeline's first batches and for one epoch of the eval pipeline.
TASK 'preempt': process 1 alone gets SIGINT (Ctrl-C) at step 3 of 100.
TASK 'eval_odd': the images and labels an evaluator reads from 13 held-out examples.
TASK 'pseudo_label': pseudo-labels with the teacher in WORKDIR/teacher into
WORKDIR/pseudo_labels (tiny_pseudo_label_config) and writes each file's SHA-1.
TASK 'train' / 'resume': trains the tiny MAE stage of tiny_multiprocess_config
in WORKDIR/stage ('train' stops after 2 steps, as a preempted run would) and
writes the losses it logged; 'resume' then reruns the finished stage with a final
evaluation missing.
TASK 'elastic': trains (or resumes) the stage WORKDIR/<spec stage> as the JSON of the
environment variable ELASTIC_SPEC says ({'stage', 'stop_after', 'mesh', 'total_steps'}),
on however many processes and devices it was started with, and writes the example keys
of this process's rows of every step it trained (config.log.example_keys: which example,
with which crop and flip) and, from process 0, the final train state as
WORKDIR/<stage's folder name>_state.npz.
Output: WORKDIR/<TASK>_process_<id>.json.
"""

import json
import os
import signal
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]

from big_pretrain import distributed  # noqa: E402  (sys.path first)
from helpers.hashes import file_hashes, image_hashes  # noqa: E402

TRAIN_BATCHES_CHECKED = 3


def _signal_at_step(signum: int, step: int, process_id: int) -> None:
  """Process `process_id` gets a real `signum` at `step`: a Ctrl-C in one host's terminal,
  or the SIGTERM of one preempted host of a pod."""
  import jax  # noqa: PLC0415
  from big_pretrain.train import faults  # noqa: PLC0415
  reached = faults.PreemptionNotice.reached

  def reached_with_signal(self, current_step):
    if current_step == step and jax.process_index() == process_id:
      os.kill(os.getpid(), signum)
    return reached(self, current_step)

  faults.PreemptionNotice.reached = reached_with_signal


def _rerun_with_final_evaluations_missing(config, workdir: str, process_id: int) -> dict:
  """Reruns the finished stage with an evaluator it has no scores for. Process 1 is told
  they are recorded (a host whose view of the shared folder lags): unless every process
  follows process 0, process 0 waits in the evaluator's collectives forever."""
  from big_pretrain.evaluators import evaluator_config  # noqa: PLC0415
  from big_pretrain.storage import stage_dir  # noqa: PLC0415
  from big_pretrain.train import loop  # noqa: PLC0415
  config.evals.reconstruction = evaluator_config('reconstruction', num_images=8)
  if process_id == 1:
    stage_dir.final_evaluations_recorded = lambda *args: True
  stage = loop.train_stage(config, workdir)
  return {'steps_run': stage.steps_run, 'evaluated': sorted(stage.eval_results)}


def _train_elastic(config, workdir: str, spec: dict) -> dict:
  """Trains spec['stage'] from wherever its checkpoints are; see the module docstring."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from big_pretrain.train.loop import train_stage  # noqa: PLC0415
  config.mesh.update(spec.get('mesh', {}))
  config.total_steps = spec.get('total_steps', config.total_steps)
  config.log.example_keys = True
  stage = train_stage(config, spec['stage'], stop_after_steps=spec.get('stop_after'))
  final_step = int(stage.state.step)
  state = {jax.tree_util.keystr(path): leaf
           for path, leaf in jax.tree_util.tree_leaves_with_path(stage.state)
           if isinstance(leaf, jax.Array)
           and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)}
  gathered = {name: np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
              for name, leaf in state.items()}
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, f'{os.path.basename(spec["stage"])}_state.npz'), **gathered)
  start_step = final_step - stage.steps_run
  # Every batch this process read, prefetched ones too, from every start: the latest record.
  keys_file = os.path.join(spec['stage'], 'example_keys',
                           f'process_{jax.process_index()}-of-{jax.process_count()}.jsonl')
  with open(keys_file) as f:
    records = {record['batch']: record['keys'] for record in map(json.loads, f)}
  return {'start_step': start_step, 'final_step': final_step,
          'keys': [records[batch] for batch in range(start_step, final_step)],
          'losses': {step: metrics['loss'] for step, metrics in stage.history}}


def main(process_id: int, num_processes: int, port: int, workdir: str, task: str) -> None:
  distributed.initialize('on', coordinator_address=f'127.0.0.1:{port}',
                         num_processes=num_processes, process_id=process_id,
                         initialization_timeout_s=60)
  import jax  # noqa: PLC0415  (after the distributed runtime)
  from big_pretrain import sharding as sharding_lib  # noqa: PLC0415
  from big_pretrain.data.train_input import InputPipeline  # noqa: PLC0415
  from helpers.tiny_config import tiny_multiprocess_config  # noqa: PLC0415

  config = tiny_multiprocess_config()
  result = {'pid': os.getpid(), 'process_index': jax.process_index(),
            'process_count': jax.process_count(), 'device_count': jax.device_count()}
  if task == 'data':
    mesh = sharding_lib.make_mesh(config.mesh)
    train = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                          seed=config.seed)
    result['train_rows'] = [image_hashes(train.next_local_numpy()['image'])
                            for _ in range(TRAIN_BATCHES_CHECKED)]
    eval_data = config.data.copy_and_resolve_references()
    eval_data.split = 'test'
    # Each batch of evaluation feeds a collective: a process with a batch more than the
    # others would hang there, so the counts must be equal.
    from helpers.batches import eval_split_batches  # noqa: PLC0415
    result['eval_rows'] = [image_hashes(batch['image'])
                          for batch in eval_split_batches(eval_data, config.batch_size)]
  elif task == 'eval_odd':
    from helpers.eval_counting import held_out_images  # noqa: PLC0415
    images, labels = held_out_images(config, sharding_lib.make_mesh(config.mesh))
    result['images'], result['labels'] = image_hashes(images), labels.tolist()
  elif task == 'pseudo_label':
    from big_pretrain.stages.pseudo_label_job import run_pseudo_label  # noqa: PLC0415
    from helpers.tiny_config import tiny_pseudo_label_config  # noqa: PLC0415
    output = os.path.join(workdir, 'pseudo_labels')
    run_pseudo_label(tiny_pseudo_label_config(), output,
                     teacher_dir=os.path.join(workdir, 'teacher'))
    result['files'] = file_hashes(output)
  elif task == 'elastic':
    result.update(_train_elastic(config, workdir, json.loads(os.environ['ELASTIC_SPEC'])))
  else:
    # Only the training tasks import the loop (Orbax, Grain, the models: seconds).
    from big_pretrain.train.loop import train_stage  # noqa: PLC0415
    if task == 'preempt':
      _signal_at_step(signal.SIGINT, 3, process_id=1)
      config.total_steps = 100
    stage_dir = os.path.join(workdir, task if task == 'preempt' else 'stage')
    stage = train_stage(config, stage_dir, stop_after_steps=2 if task == 'train' else None)
    result['preempted'] = stage.preempted
    result['losses'] = {step: metrics['loss'] for step, metrics in stage.history}
    result['final_step'] = int(stage.state.step)
    if task == 'resume':
      result['rerun'] = _rerun_with_final_evaluations_missing(config, stage_dir, process_id)
  with open(os.path.join(workdir, f'{task}_process_{process_id}.json'), 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
