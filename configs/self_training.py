"""Self-training (Zoph et al. 2020; Noisy Student): teacher -> pseudo-labels -> student, in rounds.

  python main.py --config=configs/self_training.py --workdir=DIR \
      --config.stages.teacher.data.path=/data/labelled/train \
      --config.stages.teacher.data.test_path=/data/labelled/val \
      --config.stages.pseudo_labels.data.path=/data/unlabelled \
      --config.stages.student.data.path=/data/labelled/train \
      --config.stages.student.data.test_path=/data/labelled/val
      ViT-B/16 from the fine-tuning recipe (configs/finetune.py:B): the teacher on the
      labelled images, hard pseudo-labels of confidence >= 0.3 on the unlabelled
      ones (Noisy Student), the student on both, 1:1 in every batch, with the
      paper's strongest policy S4 (RandAugment + flip + crop + large scale jitter),
      stochastic depth and dropout 0.5 before the head. Start teacher and student
      from a pretrained encoder with --config.stages.<stage>.init_from.checkpoint=CKPT.
  python main.py --config=configs/self_training.py:demo --workdir=DIR
      The embedded synthetic shapes on a CPU: 10% of the images labelled, the rest
      unlabelled (data.subset), minutes.

The argument is comma-separated: a size ('B', 'L' or 'demo'), then optionally
`rounds=N` (default 1): the student of round r is the teacher of round r + 1
(stages teacher, pseudo_labels, student, pseudo_labels_2, student_2, ...).
Run the same command again to resume; every stage keeps its folder DIR/<stage>.
"""

import ml_collections

from big_pretrain.config.defaults import chain_config, stage_config
from big_pretrain.stages import pseudo_label_job
from big_pretrain.evaluators import evaluator_config
from configs import finetune

# The demo's labelled share of the embedded data; the rest is unlabelled.
DEMO_LABELLED_FRACTION = 0.1
# The demo's class: the shape's colour (11 classes), which a 2-block ViT learns in
# minutes from 2,000 labels, to about 90%: room for the student to do better.
DEMO_LABEL = 'colour'
DEMO_TEACHER_STEPS = 600
DEMO_STUDENT_STEPS = 1600


def parse_arg(arg: str | None) -> tuple[str, int]:
  """'demo,rounds=2' -> ('demo', 2)."""
  size, rounds = 'B', 1
  for part in filter(None, (arg or '').split(',')):
    key, _, value = part.partition('=')
    if key == 'rounds' and value.isdigit() and int(value) >= 1:
      rounds = int(value)
    elif not value and key in ('B', 'L', 'demo'):
      size = key
    else:
      raise ValueError(f'configs/self_training.py: cannot read {part!r} of {arg!r}; give a '
                       'size (B, L or demo) and optionally rounds=N, e.g. "demo,rounds=2".')
  return size, rounds


# The arguments get_config takes (--config=configs/self_training.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'B', 'L', 'demo', 'demo,rounds=2')


def get_config(arg: str | None = None):
  size, rounds = parse_arg(arg)
  teacher = teacher_config(size)
  stages = {'teacher': teacher}
  previous = 'teacher'
  for round_index in range(1, rounds + 1):
    suffix = '' if round_index == 1 else f'_{round_index}'
    stages[f'pseudo_labels{suffix}'] = pseudo_labels_config(size, previous)
    stages[f'student{suffix}'] = student_config(size, f'pseudo_labels{suffix}')
    previous = f'student{suffix}'
  return chain_config(**stages)


def teacher_config(size: str):
  """The fine-tuning recipe on the labelled images (the demo: its labelled 10%)."""
  config = finetune.get_config(size)
  config.data.augment = 'S4'
  if size == 'demo':
    use_demo_settings(config)
  return config


def pseudo_labels_config(size: str, teacher_stage: str):
  config = pseudo_label_job.default_config()
  config.teacher.stage = teacher_stage
  config.labels.update(kind='hard', threshold=0.3)  # Noisy Student's confidence filter
  if size == 'demo':
    config.data.update(source='synthetic', num_examples=20_000, source_image_size=64,
                       synthetic_label=DEMO_LABEL)
    config.data.subset.update(fraction=DEMO_LABELLED_FRACTION, complement=True)
    config.batch_size = 512
    config.examples_per_shard = 6_000
    config.labels.threshold = 0.0
  else:
    config.data.source = 'image_folder'
    config.data.path = None  # Required: the unlabelled images (their labels are never read).
  return config


def student_config(size: str, pseudo_label_stage: str):
  """The teacher's recipe on the labelled images plus the pseudo-labelled ones, noised."""
  config = teacher_config(size)
  config.objective = stage_config('self_training').objective
  config.data.pseudo_labels.update(stage=pseudo_label_stage, fraction=0.5)
  config.objective.head_dropout = 0.5 if size != 'demo' else 0.2
  if size == 'demo':
    # More images to learn from than the teacher had, so more steps (Noisy Student's
    # students train longer too); the benchmark also trains a teacher this long.
    config.total_steps = DEMO_STUDENT_STEPS
  return config


def use_demo_settings(config) -> None:
  """CPU-sized teacher and student on the embedded shapes, 10% of them labelled."""
  finetune.use_demo_settings(config)
  config.objective.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  config.data.subset.update(fraction=DEMO_LABELLED_FRACTION, complement=False)
  config.data.update(augment='S4', scale_jitter=(0.8, 1.25), randaugment_ops=1,
                     randaugment_magnitude=5.0, synthetic_label=DEMO_LABEL)
  config.total_steps = DEMO_TEACHER_STEPS
  config.evals = ml_collections.ConfigDict()
  config.evals.classification = evaluator_config('classification', test_examples=1024)
