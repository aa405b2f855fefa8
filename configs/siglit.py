"""SigLiT: LiT (a text tower taught to read a locked image tower) with the sigmoid loss.

  python main.py --config=configs/siglit.py --workdir=DIR \
      --config.init_from.checkpoint=/runs/wsp/checkpoints \
      --config.data.path=/data/laion/train \
      --config.data.text.tokenizer=/data/laion/tokenizer.model

configs/lit.py with SigLIP's loss and initialisation (t' = log 10, b = -10): the
SigLIP paper's SigLiT, which reached its zero-shot numbers on four TPU chips
because the chunked loss needs no global logits. `stage_after` makes the stage
of a chain, as configs/lit.py's does.
"""

from configs import lit, siglip


# The arguments get_config takes (--config=configs/siglit.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  return siglip.with_sigmoid_loss(lit.get_config(arg))


def stage_after(earlier_stage: str, earlier_config, arg: str | None):
  return siglip.with_sigmoid_loss(lit.stage_after(earlier_stage, earlier_config, arg))
