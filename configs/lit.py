"""LiT: zero-shot for any image encoder by training a text tower against it, locked.

  python main.py --config=configs/lit.py --workdir=DIR \
      --config.init_from.checkpoint=/runs/wsp/checkpoints \
      --config.data.path=/data/laion/train \
      --config.data.text.tokenizer=/data/laion/tokenizer.model
      The image tower is the checkpoint's encoder, locked (no gradient, no
      optimizer state); `config.model` must describe it (default: ViT-L/16
      with a cls token, as configs/wsp.py). The text tower, data and optimizer
      are configs/flip.py's (choice: LiT itself trained with Adafactor), with
      no patches dropped. Evaluators: zero_shot and retrieval.

`stage_after` makes the LiT stage of a chain (configs/maws_lit.py: MAE -> WSP
-> LiT): the earlier stage's model config, its encoder taken.
"""

from big_pretrain.config.defaults import stage_config
from configs import flip

# What LiT keeps of FLIP's objective config: the text tower and the temperature.
TEXT_TOWER_KEYS = ('embed_dim', 'text_width', 'text_depth', 'text_heads', 'temperature_init')


# The arguments get_config takes (--config=configs/lit.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = flip.masked_stage(arg)  # FLIP's text tower, image-text data and evaluators
  flip_objective = config.objective
  config.objective = stage_config('lit').objective
  config.objective.update({key: flip_objective[key] for key in TEXT_TOWER_KEYS})
  config.model.update(use_cls_token=True, pool='cls')  # configs/wsp.py's encoder
  config.init_from.take = ('encoder',)  # init_from.stage or .checkpoint: required
  if arg == 'demo':
    config.total_steps = 400
    config.optim.warmup_steps = 25
    # A locked demo tower tells colours apart far better than shapes (800 steps from
    # the maws_lit demo's WSP encoder: zero-shot colour 0.31 vs chance 0.09, shape
    # 0.13 vs 0.10), so `zero_shot` is colour here and shape is reported beside it.
    config.evals.zero_shot_shape = config.evals.zero_shot
    config.evals.zero_shot = config.evals.zero_shot_colour
    del config.evals['zero_shot_colour']
  return config


def stage_after(earlier_stage: str, earlier_config, arg: str | None):
  """The LiT stage of a chain, locking `earlier_stage`'s encoder (`earlier_config`: its
  stage config, whose model config this one copies so every parameter fits)."""
  config = get_config(arg)
  config.model = earlier_config.model.copy_and_resolve_references()
  config.init_from.stage = earlier_stage
  return config
