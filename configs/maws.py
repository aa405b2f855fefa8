"""MAWS: MAE pre-pretraining -> WSP -> fine-tuning (Singh et al., 2023).

  python main.py --config=configs/maws.py --workdir=DIR \
      --config.stages.mae.data.path=/data/ig/train \
      --config.stages.wsp.data.path=/data/ig/train \
      --config.stages.wsp.data.labels.vocabulary=/data/ig/vocab.txt \
      --config.stages.finetune.data.path=/data/imagenet/train \
      --config.stages.finetune.data.test_path=/data/imagenet/val
  python main.py --config=configs/maws.py:demo --workdir=DIR   # CPU, embedded data

configs/mae_then_wsp.py, then configs/finetune.py:L initialized from the WSP
encoder (its hashtag head is dropped; a fresh class head is trained): how
MAWS reports its fine-tuned ImageNet-1k numbers (B 86.8 ... 6.5B 90.1).
Each stage trains in DIR/<stage>; run the same command again to resume.
"""

from configs import finetune, mae_then_wsp


def get_config(arg: str | None = None):
  config = mae_then_wsp.get_config(arg)
  config.stages.finetune = finetune.stage_after('wsp', arg)
  if arg == 'demo':
    mae_then_wsp.use_colour_as_demo_class(config)
    # Every stage's probe reads the same images as the fine-tuning stage's.
    config.stages.finetune.evals.linear_probe = (
        config.stages.wsp.evals.linear_probe.copy_and_resolve_references())
  return config
