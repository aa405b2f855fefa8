"""AIM: autoregressive image pretraining with prefix-causal attention.

  python main.py --config=configs/aim.py --workdir=DIR \
      --config.data.path=/data/train --config.data.test_path=/data/val
      The paper's 600M recipe: trunk 1536 x 24, patch 14, 224 px, no cls token;
      head of 12 per-patch MLP blocks of width 2048; batch 4096, AdamW
      (0.9, 0.95), wd 0.05, lr 1e-3, cosine; 500k steps.
  python main.py --config=configs/aim.py:demo --workdir=DIR    # CPU, embedded data
  python main.py --config=configs/aim.py:7B --workdir=DIR ...    # also :1B, :3B
"""

from big_pretrain.config.defaults import stage_config, use_embedded_demo_data
from big_pretrain.evaluators import evaluator_config


# The paper's trunks (width x depth): 600M (1536 x 24), 1B (2048 x 24), 3B (3072 x 24),
# 7B (4096 x 32); the larger ones shard their state over every chip (FSDP).
SIZES = ('600M', '1B', '3B', '7B')


# The arguments get_config takes (--config=configs/aim.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, *SIZES, 'demo')


def get_config(arg: str | None = None):
  size = arg if arg in SIZES else '600M'
  config = stage_config('aim')
  config.model.variant = f'{size}/14'
  if size in ('3B', '7B'):
    config.mesh.update(data=1, fsdp=-1)
  config.model.use_cls_token = False
  config.model.pool = 'gap'
  config.model.dtype = 'bfloat16'
  config.batch_size = 4096
  config.total_steps = 500_000
  config.optim.lr_per_256 = 1e-3 * 256 / 4096
  config.optim.weight_decay = 0.05
  config.optim.b2 = 0.95
  config.optim.warmup_steps = 5_000
  config.data.source = 'image_folder'
  config.data.path = None
  config.data.image_size = 224
  config.data.crop_scale = (0.4, 1.0)
  config.checkpoint.every_steps = 1000
  # The paper probes the mean of the last 6 blocks with one attentive query.
  config.evals.attentive_probe = evaluator_config('attentive_probe', every_steps=50_000,
                                                  num_last_blocks=6)
  config.evals.linear_probe = evaluator_config('linear_probe', every_steps=50_000)

  if arg == 'demo':
    config.model.variant = 'mu/8'
    config.model.dtype = 'float32'
    config.objective.head_width = 64
    config.objective.head_depth = 2
    config.batch_size = 64
    config.total_steps = 1000
    config.optim.lr_per_256 = 4e-3
    config.optim.warmup_steps = 50
    use_embedded_demo_data(config)
    config.data.crop_scale = (0.8, 1.0)
    config.checkpoint.every_steps = 200
    config.log.every_steps = 50
    config.evals.attentive_probe.update(every_steps=0, num_last_blocks=2)
    config.evals.linear_probe.update(every_steps=0)
    # The embedded data's second label (the shape's colour), which small
    # models learn long before shape: both probes on both labels.
    colour = {'synthetic_label': 'colour'}
    config.evals.attentive_probe_colour = evaluator_config(
        'attentive_probe', num_last_blocks=2, train_data=dict(split='train', **colour),
        test_data=dict(split='test', **colour))
    config.evals.linear_probe_colour = evaluator_config(
        'linear_probe', train_data=dict(split='train', **colour),
        test_data=dict(split='test', **colour))
  elif arg and arg not in SIZES:
    raise ValueError(f'configs/aim.py: unknown variant {arg!r}; use no argument, one of '
                     f'{SIZES} or "demo".')
  return config
