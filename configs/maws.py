"""MAWS: MAE pre-pretraining -> WSP -> fine-tuning (Singh et al., 2023).

  python main.py --config=configs/maws.py --workdir=DIR \
      --config.stages.mae.data.path=/data/ig/train \
      --config.stages.wsp.data.path=/data/ig/train \
      --config.stages.wsp.data.labels.vocabulary=/data/ig/vocab.txt \
      --config.stages.finetune.data.path=/data/imagenet/train \
      --config.stages.finetune.data.test_path=/data/imagenet/val
  python main.py --config=configs/maws.py:demo --workdir=DIR   # CPU, embedded data
  python main.py --config=configs/maws.py:6.5B --workdir=DIR --compile_for=v5p-512
      The paper's other sizes (:H, :2B, :6.5B; no argument: L/16), here compiled for a
      TPU slice to see whether each stage fits it (see docs/tpu_pods.md, "Before booking a TPU").

configs/mae_then_wsp.py, then configs/finetune.py:L initialized from the WSP
encoder (its hashtag head is dropped; a fresh class head is trained): how
MAWS reports its fine-tuned ImageNet-1k numbers (B 86.8 ... 6.5B 90.1).
Each stage trains in DIR/<stage>; run the same command again to resume.
"""

from configs import finetune, mae_then_wsp

# The paper's encoders (width, depth, heads): L/16 (1024, 24, 16), H/14 (1280, 32, 16),
# 2B/14 (2560, 24, 32), 6.5B/14 (4096, 32, 32). configs/maws.py:H and so on; the two
# largest shard their state over every chip (FSDP), in every stage.
SIZES = {'L': 'L/16', 'H': 'H/14', '2B': '2B/14', '6.5B': '6.5B/14'}


# The arguments get_config takes (--config=configs/maws.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo', *SIZES)


def get_config(arg: str | None = None):
  if arg not in (None, '', 'demo', *SIZES):
    raise ValueError(f'configs/maws.py: unknown variant {arg!r}; use no argument (L), one of '
                     f'{tuple(SIZES)} or "demo".')
  size = arg if arg in SIZES else None
  config = mae_then_wsp.chain(None if size else arg)
  config.stages.finetune = finetune.stage_after('wsp', None if size else arg)
  if size in ('H', '2B', '6.5B'):  # MAE's ViT-H/14 recipe for fine-tuning the larger ones
    recipe = finetune.get_config('H')
    recipe.init_from = config.stages.finetune.init_from
    config.stages.finetune = recipe
  if size:
    for stage in config.stages.values():
      stage.model.variant = SIZES[size]
      if size in ('2B', '6.5B'):
        stage.mesh.update(data=1, fsdp=-1)
  if arg == 'demo':
    mae_then_wsp.use_colour_as_demo_class(config)
    # Every stage's probe reads the same images as the fine-tuning stage's.
    config.stages.finetune.evals.linear_probe = (
        config.stages.wsp.evals.linear_probe.copy_and_resolve_references())
  return config
