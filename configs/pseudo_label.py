"""Pseudo-labels on their own: a finished classifier stage labels a folder of unlabelled images.

  python main.py --config=configs/pseudo_label.py --workdir=OUT \
      --config.teacher.workdir=RUNS/finetune --config.data.path=/data/unlabelled
  Then a student: --config.data.pseudo_labels.path=OUT (objective 'self_training').

Hard labels with Noisy Student's confidence threshold (0.3); for soft labels
--config.labels.kind=soft --config.labels.top_k=5 --config.labels.temperature=1.
Inside a chain, configs/self_training.py adds the same stage after its teacher.
"""

from big_pretrain.stages import pseudo_label_job


# The arguments get_config takes (--config=configs/pseudo_label.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None,)


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f'configs/pseudo_label.py: unknown variant {arg!r}; it takes no argument.')
  config = pseudo_label_job.default_config()
  config.teacher.workdir = None  # Required: the teacher stage's folder (config.json, checkpoints/)
  config.data.source = 'image_folder'
  config.data.path = None        # Required: the unlabelled images
  config.labels.update(kind='hard', threshold=0.3)
  return config
