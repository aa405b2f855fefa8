"""MAE pre-training (He et al., 2021).

  python main.py --config=configs/mae.py --workdir=DIR --config.data.path=/data/imagenet/train
      The paper's recipe: ViT-L/16, mask ratio 0.75, batch 4096, AdamW
      (0.9, 0.95), wd 0.05, lr 1.5e-4 per 256, 40 warmup epochs + cosine,
      800 epochs of ImageNet-1k, RandomResizedCrop(224, 0.2-1) + flip.
  python main.py --config=configs/mae.py:demo --workdir=DIR
      A tiny MAE on the embedded synthetic shapes, minutes on a CPU.
  python main.py --config=configs/mae.py:imagenette --workdir=DIR --config.data.tfds_data_dir=D
      ViT-B/16 on one accelerator (a Colab TPU or GPU): Imagenette at 224 px,
      prepared in D first (launch/colab_runtime.py prepare_tfds_command).
"""

from big_pretrain.config.defaults import stage_config, use_embedded_demo_data
from big_pretrain.evaluators import evaluator_config

IMAGENET_TRAIN_IMAGES = 1_281_167


def steps_for_epochs(epochs: float, dataset_size: int, batch_size: int) -> int:
  return int(round(epochs * dataset_size / batch_size))


# The arguments get_config takes (--config=configs/mae.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo', 'imagenette')


def get_config(arg: str | None = None):
  config = stage_config('mae')
  config.model.variant = 'L/16'
  config.model.dtype = 'bfloat16'
  config.batch_size = 4096
  config.total_steps = steps_for_epochs(800, IMAGENET_TRAIN_IMAGES, config.batch_size)
  config.optim.lr_per_256 = 1.5e-4
  config.optim.weight_decay = 0.05
  config.optim.b2 = 0.95
  config.optim.warmup_steps = steps_for_epochs(40, IMAGENET_TRAIN_IMAGES, config.batch_size)
  config.data.source = 'image_folder'
  config.data.path = None  # Required: e.g. --config.data.path=/data/imagenet/train
  config.data.image_size = 224
  config.data.crop_scale = (0.2, 1.0)
  config.checkpoint.every_steps = 1000
  config.evals.reconstruction = evaluator_config('reconstruction', every_steps=10_000)

  if arg == 'demo':
    config.model.variant = 'mu/8'
    config.model.dtype = 'float32'
    config.objective.decoder_width = 64
    config.objective.decoder_depth = 2
    config.objective.decoder_heads = 4
    config.batch_size = 64
    config.total_steps = 1000
    config.optim.lr_per_256 = 4e-3
    config.optim.warmup_steps = 50
    use_embedded_demo_data(config)
    config.checkpoint.every_steps = 100
    config.log.every_steps = 50
    config.evals.reconstruction.every_steps = 500
  elif arg == 'imagenette':
    # Sized for one Colab TPU (v2-8: 8 cores of 8 GiB; v5e-1, v6e-1: 16 and 32 GiB)
    # or GPU (16-80 GiB): batch 256 fits them all with model.remat='auto'.
    # Imagenette: 9,469 training and 3,925 validation images of 10 ImageNet
    # classes, downloaded by TFDS (about 330 MB at 320 px).
    config.model.variant = 'B/16'
    config.batch_size = 256
    config.total_steps = 2000  # 54 epochs
    config.optim.warmup_steps = 200
    config.data.source = 'tfds'
    config.data.tfds_name = 'imagenette/320px-v2'
    config.data.tfds_test_split = 'validation'
    config.checkpoint.every_steps = 500
    config.log.every_steps = 50  # each log line has images/s and MFU
    config.evals.reconstruction.every_steps = 1000
    # Does the MAE encoder separate the 10 classes? k-NN over all of both splits.
    config.evals.knn = evaluator_config('knn', train_examples=9469, test_examples=3925)
  elif arg:
    raise ValueError(
        f'configs/mae.py: unknown variant {arg!r}; use no argument, "demo" or "imagenette".')
  return config
