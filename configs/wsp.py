"""WSP: weakly-supervised pretraining on hashtags (MAWS / SWAG style).

  python main.py --config=configs/wsp.py --workdir=DIR \
      --config.data.path=/data/ig/train --config.data.labels.vocabulary=/data/ig/vocab.txt
      ViT-L/16, softmax CE over a hashtag vocabulary, batch 4096, AdamW.
      The hyper-parameters are our choice where MAWS leaves them open.
  python main.py --config=configs/wsp.py:demo --workdir=DIR
      A tiny WSP on the embedded synthetic shapes and their hashtags.
"""

from big_pretrain.config.defaults import stage_config, use_embedded_demo_data
from big_pretrain.data.text.labels import synthetic_vocabulary_path
from big_pretrain.evaluators import evaluator_config


# The arguments get_config takes (--config=configs/wsp.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = stage_config('wsp')
  config.model.variant = 'L/16'
  config.model.dtype = 'bfloat16'
  config.batch_size = 4096
  config.total_steps = 100_000
  config.optim.lr_per_256 = 6.25e-5         # (choice) 1e-3 at batch 4096
  config.optim.weight_decay = 0.1           # (choice)
  config.optim.b2 = 0.999
  config.optim.warmup_steps = 5_000
  config.optim.clip_grad_norm = 1.0
  config.data.source = 'image_folder'
  config.data.path = None                   # Required: your image-text data.
  # Required: see `python -m big_pretrain.data.text.build_vocabulary labels`.
  config.data.labels.vocabulary = None
  config.data.image_size = 224
  config.data.crop_scale = (0.08, 1.0)      # WSP uses the classification crop range.
  config.checkpoint.every_steps = 1000
  config.evals.linear_probe = evaluator_config('linear_probe', every_steps=10_000)
  config.evals.knn = evaluator_config('knn', every_steps=10_000)

  if arg == 'demo':
    config.model.variant = 'mu/8'
    config.model.dtype = 'float32'
    config.batch_size = 64
    config.total_steps = 600
    config.optim.lr_per_256 = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 50
    use_embedded_demo_data(config)
    config.data.crop_scale = (0.35, 1.0)
    config.data.labels.vocabulary = synthetic_vocabulary_path()
    config.checkpoint.every_steps = 100
    config.log.every_steps = 50
    config.evals.linear_probe.update(every_steps=0, train_examples=2048, test_examples=1024)
    config.evals.knn.update(every_steps=0, train_examples=2048, test_examples=1024)
  elif arg:
    raise ValueError(f'configs/wsp.py: unknown variant {arg!r}; use no argument or "demo".')
  return config
