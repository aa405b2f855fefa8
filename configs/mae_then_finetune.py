"""MAE pretraining, then fine-tuning its encoder: the protocol MAE's headline numbers use.

  python main.py --config=configs/mae_then_finetune.py --workdir=DIR \
      --config.stages.mae.data.path=/data/imagenet/train \
      --config.stages.finetune.data.path=/data/imagenet/train \
      --config.stages.finetune.data.test_path=/data/imagenet/val
  python main.py --config=configs/mae_then_finetune.py:demo --workdir=DIR   # CPU, embedded data

configs/mae.py (ViT-L/16), then configs/finetune.py:L initialized from MAE's
final encoder (the decoder and mask token are never read; the head is fresh).
Each stage trains in DIR/<stage>; run the same command again to resume.
"""

from big_pretrain.config.defaults import chain_config
from configs import finetune, mae


# The arguments get_config takes (--config=configs/mae_then_finetune.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = chain_config(mae=mae.get_config(arg), finetune=finetune.stage_after('mae', arg))
  if arg == 'demo':
    # The MAE stage probes its encoder as the fine-tuning stage does, so the numbers compare.
    config.stages.mae.evals.linear_probe = (
        config.stages.finetune.evals.linear_probe.copy_and_resolve_references())
  return config
