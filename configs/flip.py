"""FLIP: masked image-text contrastive pretraining, then a short unmasked tuning stage.

  python main.py --config=configs/flip.py --workdir=DIR \
      --config.stages.pretrain.data.path=/data/laion/train \
      --config.stages.pretrain.data.text.tokenizer=/data/laion/tokenizer.model ...
      The paper's ViT-L/16 recipe: 50% of patches dropped, batch 32768, AdamW
      (0.9, 0.95), wd 0.2, lr 4e-6 per 256, warmup + cosine; then r = 0 at a
      lower lr, initialized from the masked stage.
  python main.py --config=configs/flip.py:demo --workdir=DIR    # CPU, embedded data

Each stage trains in DIR/<stage>; run the same command again to resume.
"""

import copy

from big_pretrain.config.defaults import chain_config, stage_config, use_embedded_demo_data
from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
from big_pretrain.evaluators import evaluator_config

LAION_400M = 400_000_000
# Everything the unmasked stage takes from the masked one.
FLIP_PARAMS = ('encoder', 'text_encoder', 'image_projection', 'text_projection', 'logit_scale')


def masked_stage(arg):
  config = stage_config('flip')
  config.model.variant = 'L/16'
  config.model.use_cls_token = False
  config.model.pool = 'gap'                 # FLIP: the mean of the output tokens
  config.model.dtype = 'bfloat16'
  config.objective.mask_ratio = 0.5
  config.objective.embed_dim = 768
  config.objective.text_width = 768
  config.objective.text_depth = 12
  config.objective.text_heads = 12
  config.objective.temperature_init = 0.07  # the logit scale starts at 1 / 0.07
  config.batch_size = 32768
  config.total_steps = 6_400_000_000 // 32768  # 6.4B samples seen (16 epochs of LAION-400M)
  config.optim.lr_per_256 = 4e-6
  config.optim.weight_decay = 0.2
  config.optim.b2 = 0.95
  config.optim.warmup_steps = 1_600
  config.data.source = 'image_folder'
  config.data.path = None                   # Required: images with caption .txt files.
  config.data.text.tokenizer = None         # Required: a tokenizer file or SentencePiece .model.
  config.data.text.max_length = 32
  config.data.image_size = 224
  config.data.crop_scale = (0.5, 1.0)
  config.checkpoint.every_steps = 1000
  config.evals.zero_shot = evaluator_config('zero_shot', every_steps=10_000)
  config.evals.retrieval = evaluator_config('retrieval', every_steps=10_000)

  if arg == 'demo':
    config.model.variant = 'mu/8'
    config.model.dtype = 'float32'
    config.objective.update(embed_dim=64, text_width=64, text_depth=2, text_heads=4)
    config.batch_size = 128
    config.total_steps = 800
    config.optim.lr_per_256 = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 50
    use_embedded_demo_data(config)
    config.data.crop_scale = (0.8, 1.0)
    config.data.text.tokenizer = synthetic_tokenizer_path()
    config.data.text.max_length = 16
    config.checkpoint.every_steps = 200
    config.log.every_steps = 50
    # Prompts in the captions' own words ('photo' and 'of' would be <unk>).
    prompts = ('a {}', 'a large {}', 'a small {}')
    config.evals.zero_shot.update(every_steps=0, test_examples=1024, prompts=prompts)
    # The embedded data's second label: the shape's colour. At this size the
    # towers learn colour long before shape, so both are reported.
    config.evals.zero_shot_colour = evaluator_config(
        'zero_shot', test_examples=1024, prompts=prompts,
        test_data={'split': 'test', 'synthetic_label': 'colour'})
    config.evals.retrieval.update(every_steps=0, test_examples=512)
  elif arg:
    raise ValueError(f'configs/flip.py: unknown variant {arg!r}; use no argument or "demo".')
  return config


# The arguments get_config takes (--config=configs/flip.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  pretrain = masked_stage(arg)
  return chain_config(pretrain=pretrain, unmasked=unmasked_stage_after(pretrain))


def unmasked_stage_after(pretrain):
  """FLIP's short unmasked tuning stage (r = 0, lr / 10, 1/20 of the steps), starting from
  every parameter of the masked stage `pretrain` (its loss's bias too, for the sigmoid)."""
  unmasked = copy.deepcopy(pretrain)
  unmasked.objective.mask_ratio = 0.0
  unmasked.optim.lr_per_256 = pretrain.optim.lr_per_256 / 10
  unmasked.total_steps = max(1, pretrain.total_steps // 20)
  unmasked.optim.warmup_steps = max(1, unmasked.total_steps // 10)
  # Logged and saved at least a few times in its 1/20 of the steps.
  unmasked.log.every_steps = min(unmasked.log.every_steps, max(1, unmasked.total_steps // 4))
  unmasked.checkpoint.every_steps = min(unmasked.checkpoint.every_steps,
                                        max(1, unmasked.total_steps // 2))
  unmasked.init_from.stage = 'pretrain'
  unmasked.init_from.take = FLIP_PARAMS + (
      ('logit_bias',) if pretrain.objective.loss == 'sigmoid' else ())
  return unmasked
