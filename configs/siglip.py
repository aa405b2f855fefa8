"""SigLIP: image-text pretraining with the sigmoid loss (Zhai et al., 2023).

  python main.py --config=configs/siglip.py --workdir=DIR \
      --config.data.path=/data/webli/train \
      --config.data.text.tokenizer=/data/webli/tokenizer.model
      The paper's recipe: ViT-B/16 at 224 px and a B-sized text tower (16 tokens),
      every pair of the batch a yes/no decision, t' = log 10 and b = -10 learned,
      batch 32768, Adam(b2 = 0.95) at lr 1e-3 with weight decay 1e-4, warmup +
      cosine. No patches dropped.
  python main.py --config=configs/siglip.py:masked --workdir=DIR
      FLIP's recipe (50% of patches dropped, then the unmasked tuning stage) with
      the sigmoid loss in both stages: two stages, `pretrain` and `unmasked`.
  python main.py --config=configs/siglip.py:demo --workdir=DIR          # CPU, embedded data
  python main.py --config=configs/siglip.py:masked_demo --workdir=DIR   # CPU, both stages

The loss is chunked over the devices (objectives/sigmoid_loss.py): a device holds
local x local logits, never the global batch's rows, which is what lets batch 32k
train on a small slice. Choosing between it and FLIP's softmax: docs/siglip.md.
"""

from big_pretrain.config.defaults import chain_config
from configs import flip

# The arguments get_config takes (--config=configs/siglip.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, '', 'demo', 'masked', 'masked_demo')
# The steps of configs/flip.py (6.4B examples seen), for a like-for-like comparison.
EXAMPLES_SEEN = 6_400_000_000


def with_sigmoid_loss(config):
  """A FLIP stage config switched to the sigmoid loss with the paper's initialisation."""
  config.objective.loss = 'sigmoid'
  config.objective.temperature_init = 0.1  # t = exp(t'), t' = log 10
  config.objective.bias_init = -10.0
  return config


def siglip_stage(demo: bool):
  """The unmasked SigLIP stage (the paper's B/16 recipe, or the demo's CPU size)."""
  config = with_sigmoid_loss(flip.masked_stage('demo' if demo else None))
  config.objective.mask_ratio = 0.0
  if demo:
    # At demo size the towers tell colours apart long before shapes (configs/flip.py):
    # `zero_shot` is colour here, and shape is reported beside it.
    config.evals.zero_shot_shape = config.evals.zero_shot
    config.evals.zero_shot = config.evals.zero_shot_colour
    del config.evals['zero_shot_colour']
    return config
  config.model.variant = 'B/16'
  config.objective.update(embed_dim=768, text_width=768, text_depth=12, text_heads=12)
  config.data.text.max_length = 16
  config.batch_size = 32768
  config.total_steps = EXAMPLES_SEEN // config.batch_size
  config.optim.lr_per_256 = 1e-3 * 256 / config.batch_size  # lr 1e-3 at batch 32k
  config.optim.weight_decay = 1e-4
  config.optim.b2 = 0.95
  config.optim.warmup_steps = 5_000  # (choice) the paper gives the peak lr, not this
  return config


def get_config(arg: str | None = None):
  if arg not in VARIANTS:
    raise ValueError(f'configs/siglip.py: unknown variant {arg!r}; use no argument, "demo", '
                     '"masked" or "masked_demo".')
  if arg in (None, '', 'demo'):
    return siglip_stage(demo=arg == 'demo')
  pretrain = with_sigmoid_loss(flip.masked_stage('demo' if arg == 'masked_demo' else None))
  return chain_config(pretrain=pretrain, unmasked=flip.unmasked_stage_after(pretrain))
