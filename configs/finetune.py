"""Fine-tuning a pretrained ViT for classification: MAE's recipe (He et al., 2021, Table 9).

  python main.py --config=configs/finetune.py:B --workdir=DIR \
      --config.init_from.checkpoint=/runs/mae/checkpoints \
      --config.data.path=/data/imagenet/train --config.data.test_path=/data/imagenet/val
      ViT-B/16 (":L" ViT-L/16, ":H" ViT-H/14): AdamW (0.9, 0.999), wd 0.05, lr 5e-4
      (B) / 1e-3 (L, H) per 256, batch 1024, layer-wise lr decay 0.65 (B) / 0.75
      (L, H), 5 warmup epochs + cosine to 1e-6, drop path 0.1 / 0.2 / 0.3, label
      smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment (9, 0.5), random erasing
      0.25, 100 (B) / 50 (L, H) epochs; GAP + LayerNorm; eval: resize 256, crop 224.
  python main.py --config=configs/finetune.py:demo --workdir=DIR
      From scratch on the embedded synthetic shapes, minutes on a CPU.

Partial fine-tuning (MAE Fig. 9): --config.objective.trainable=last_k_blocks
--config.objective.trainable_blocks=1, or trainable=last_block_mlp, or head.
"""

from big_pretrain.config.defaults import stage_config, use_embedded_demo_data
from big_pretrain.evaluators import evaluator_config
from configs.mae import IMAGENET_TRAIN_IMAGES, steps_for_epochs

# variant -> (ViT, lr per 256, layer decay, drop path, epochs)
RECIPES = {
    'B': ('B/16', 5e-4, 0.65, 0.1, 100),
    'L': ('L/16', 1e-3, 0.75, 0.2, 50),
    'H': ('H/14', 1e-3, 0.75, 0.3, 50),
}
MIN_LR = 1e-6


# The arguments get_config takes (--config=configs/finetune.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, *RECIPES, 'demo')


def get_config(arg: str | None = None):
  size = 'B' if arg in (None, '', 'demo') else arg
  if size not in RECIPES:
    raise ValueError(f'configs/finetune.py: unknown variant {arg!r}; use B, L, H or demo.')
  variant, lr_per_256, layer_decay, drop_path, epochs = RECIPES[size]
  config = stage_config('finetune')
  config.model.variant = variant
  config.model.pool = 'gap'
  config.model.dtype = 'bfloat16'
  config.model.drop_path = drop_path
  config.batch_size = 1024
  config.total_steps = steps_for_epochs(epochs, IMAGENET_TRAIN_IMAGES, config.batch_size)
  config.optim.update(lr_per_256=lr_per_256, b1=0.9, b2=0.999, weight_decay=0.05,
                      layer_decay=layer_decay, no_weight_decay=('cls_token', 'pos_embedding'),
                      end_lr_fraction=MIN_LR / (lr_per_256 * config.batch_size / 256),
                      warmup_steps=steps_for_epochs(5, IMAGENET_TRAIN_IMAGES, config.batch_size))
  config.data.source = 'image_folder'
  config.data.path = None       # Required: e.g. --config.data.path=/data/imagenet/train
  config.data.test_path = None  # Required: e.g. --config.data.test_path=/data/imagenet/val
  config.data.image_size = 224
  config.data.crop_scale = (0.08, 1.0)
  config.data.augment = 'crop+flip+randaugment+erasing'
  config.data.eval_crop_fraction = 224 / 256
  config.checkpoint.every_steps = 1000
  config.evals.classification = evaluator_config('classification', every_steps=5_000)

  if arg == 'demo':
    use_demo_settings(config)
  return config


def stage_after(earlier_stage: str, arg: str | None):
  """The fine-tuning stage of a chain, from `earlier_stage`'s encoder: ':demo' for a demo
  chain, else ViT-L's recipe."""
  config = get_config('demo' if arg == 'demo' else 'L')
  config.init_from.stage = earlier_stage
  config.init_from.take = ('encoder',)
  return config


def use_demo_settings(config) -> None:
  """A CPU-sized fine-tuning stage on the embedded synthetic data (`:demo` configs).

  The recipe's machinery at a strength a 2-block model can learn under in 800
  steps: the full recipe (mixup 0.8 / cutmix 1.0, RandAugment (2, 9), erasing
  0.25) keeps such a short run at chance (measured: top-1 0.14 at 600 steps).
  """
  config.model.update(variant='mu/8', dtype='float32', drop_path=0.1)
  config.batch_size = 64
  config.total_steps = 800
  config.optim.update(lr_per_256=4e-3, warmup_steps=50, layer_decay=0.75,
                      end_lr_fraction=0.01)
  config.objective.update(mixup_alpha=0.2, cutmix_alpha=0.2)
  use_embedded_demo_data(config)
  config.data.update(crop_scale=(0.35, 1.0), eval_crop_fraction=1.0, randaugment_ops=1,
                     randaugment_magnitude=5.0, erasing_prob=0.1)
  config.checkpoint.every_steps = 100
  config.log.every_steps = 50
  config.evals.classification.update(every_steps=400, test_examples=1024)
  # The same probe as the pretraining stages': fine-tuning should beat it.
  config.evals.linear_probe = evaluator_config('linear_probe', train_examples=2048,
                                               test_examples=1024)
