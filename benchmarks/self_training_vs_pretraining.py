"""The shape of "Rethinking Pre-training and Self-training" (Zoph et al. 2020) at CPU size.

The embedded shapes (their colour: 11 classes), 10% of the images labelled
and the other 90% used as unlabelled images (data.subset). Under a weak (S1:
flip + crop) and a strong (S4: RandAugment + flip + crop + large scale jitter)
policy, with one training budget for every classifier:

  supervised            the teacher: trained on the labelled 10% alone
  self-training         its hard pseudo-labels on the 90%, and a student from
                        scratch on both, 1:1 in every batch
  MAE + fine-tune       the same supervised run from an MAE encoder pretrained
                        on all the images (configs/mae.py:demo)
  MAE + self-training   that run as the teacher, and a student from the same
                        MAE encoder

Prints held-out top-1 of each, the pseudo-labels' accuracy against the
unlabelled images' true labels (which no student sees), and the paper's
three claims as measured here.

  python benchmarks/self_training_vs_pretraining.py                     # ~25 min on 2 CPU cores
  python benchmarks/self_training_vs_pretraining.py --steps=1600 --policies=S4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Run from anywhere: the configs/ package lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from big_pretrain.data import sources  # noqa: E402
from big_pretrain.data.records import decode_pseudo_label_record  # noqa: E402
from big_pretrain.data.sources import pseudo_labelled as records_lib  # noqa: E402
from big_pretrain.stages import chain  # noqa: E402
from configs import mae, self_training  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=1200,
                      help='training steps of every teacher and student (batch 64)')
  parser.add_argument('--mae_steps', type=int, default=None, help='default: configs/mae.py:demo')
  parser.add_argument('--policies', default='S1,S4', help='comma-separated, of S1 ... S4')
  parser.add_argument('--workdir', default=None,
                      help='default: a temporary folder; a finished arm is not run again')
  return parser.parse_args()


def arm_config(policy: str, steps: int, mae_checkpoint: str | None):
  """teacher -> pseudo_labels -> student at `policy`, from scratch or from an MAE encoder."""
  config = self_training.get_config('demo')
  for name in ('teacher', 'student'):
    stage = config.stages[name]
    stage.data.augment = policy
    stage.total_steps = steps
    stage.init_from.checkpoint = mae_checkpoint
  return config


def pseudo_label_accuracy(folder: str) -> float:
  """The share of the pseudo-labels that are the unlabelled images' true class."""
  metadata = records_lib.read_metadata(folder)
  data = self_training.pseudo_labels_config('demo', 'teacher').data
  unlabelled = sources.build_source(data)
  shards = [os.path.join(folder, s['file']) for s in metadata['shards'] if s['num_records']]
  records = grain.sources.ArrayRecordDataSource(shards)
  right = 0
  for i in range(len(records)):
    record = decode_pseudo_label_record(records[i])
    right += int(record['label_ids'][0]) == unlabelled[record['index']]['label']
  return right / max(len(records), 1)


def main():
  args = parse_args()
  logging.set_verbosity(logging.WARNING)
  workdir = args.workdir or tempfile.mkdtemp(prefix='self_training_benchmark_')
  print(f'workdir: {workdir}', flush=True)
  seconds = {}

  start = time.time()
  mae_config = mae.get_config('demo')
  mae_config.evals = type(mae_config.evals)()  # the encoder only
  if args.mae_steps:
    mae_config.total_steps = args.mae_steps
  chain.run(mae_config, os.path.join(workdir, 'mae'))
  seconds['mae'] = time.time() - start
  print(f'MAE on all {mae_config.data.num_examples} images: {seconds["mae"]:.0f} s', flush=True)

  rows = []
  for policy in args.policies.split(','):
    for init, checkpoint in (('scratch', None), ('MAE', os.path.join(workdir, 'mae'))):
      start = time.time()
      arm_dir = os.path.join(workdir, f'{policy}_{init}')
      results = chain.run(arm_config(policy, args.steps, checkpoint), arm_dir)
      elapsed = time.time() - start
      teacher = results['teacher']['classification']
      student = results['student']['classification']
      accuracy = pseudo_label_accuracy(os.path.join(arm_dir, 'pseudo_labels'))
      print(f'{policy} from {init}: teacher {teacher["top1"]:.3f}, pseudo-labels '
            f'{accuracy:.3f}, student {student["top1"]:.3f} ({elapsed:.0f} s)', flush=True)
      rows.append((policy, init, teacher['top1'], accuracy, student['top1'], elapsed,
                   teacher['chance'], int(teacher['examples'])))

  print()
  print(f'ViT mu/8 at 32 px, every teacher and student {args.steps} steps x batch 64; MAE '
        f'{mae_config.total_steps} steps on all images; 2,000 labelled, 18,000 unlabelled. '
        f'Held-out top-1 on {rows[0][7]} images; chance {rows[0][6]:.3f}.')
  print()
  print('| policy | init | supervised (teacher) | pseudo-label accuracy | self-training '
        '(student) | gain | time s |')
  print('|---|---|---:|---:|---:|---:|---:|')
  for policy, init, teacher, accuracy, student, elapsed, _, _ in rows:
    label = 'scratch' if init == 'scratch' else 'MAE encoder'
    print(f'| {policy} | {label} | {teacher:.3f} | {accuracy:.3f} | {student:.3f} | '
          f'{student - teacher:+.3f} | {elapsed:.0f} |')
  print()
  by_arm = {(r[0], r[1]): r for r in rows}
  for policy in args.policies.split(','):
    scratch, pretrained = by_arm[(policy, 'scratch')], by_arm[(policy, 'MAE')]
    print(f'{policy}: pre-training adds {pretrained[2] - scratch[2]:+.3f} to supervised; '
          f'self-training adds {scratch[4] - scratch[2]:+.3f} from scratch and '
          f'{pretrained[4] - pretrained[2]:+.3f} on top of pre-training.')


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
