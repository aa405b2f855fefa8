"""MAE pre-pretraining, then WSP initialized from the MAE encoder (MAWS).

  python main.py --config=configs/mae_then_wsp.py --workdir=DIR \
      --config.stages.mae.data.path=/data/ig/train \
      --config.stages.wsp.data.path=/data/ig/train \
      --config.stages.wsp.data.labels.vocabulary=/data/ig/vocab.txt
  python main.py --config=configs/mae_then_wsp.py:demo --workdir=DIR   # CPU, embedded data

The MAE stage is configs/mae.py, the WSP stage configs/wsp.py with
`init_from.stage='mae'`: its encoder starts from MAE's final checkpoint (the
decoder and mask token are dropped, the head is fresh). MAWS finds about one
epoch of MAE enough; gains grow with model size. Each stage trains in
DIR/<stage>; run the same command again to resume where it stopped.
"""

from big_pretrain.config.defaults import chain_config
from big_pretrain.evaluators import evaluator_config
from configs import mae, wsp


# The arguments get_config takes (--config=configs/mae_then_wsp.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = chain(arg)
  if arg == 'demo':
    probe_the_shape(config)
  return config


def chain(arg: str | None = None):
  """MAE, then WSP from its encoder; the chains that extend this one (maws.py,
  maws_lit.py) start here and choose their demo's label themselves."""
  config = chain_config(mae=mae.get_config(arg), wsp=wsp.get_config(arg))
  config.stages.wsp.init_from.stage = 'mae'
  config.stages.wsp.init_from.take = ('encoder',)
  # Both stages probe their encoder the same way, so the numbers compare.
  for name in ('linear_probe', 'knn'):
    config.stages.mae.evals[name] = config.stages.wsp.evals[name].copy_and_resolve_references()
  if arg == 'demo':
    # The untrained encoder's probes, before MAE's first step: the baseline that
    # shows what pretraining added (the printout's 'mae (start)' rows).
    for name in ('linear_probe', 'knn'):
      config.stages.mae.evals[name].at_start = True
    # MAWS's low-shot probes of WSP's encoder: fitted on k labelled images per class.
    config.stages.wsp.evals.low_shot = evaluator_config(
        'low_shot', shots=(1, 5, 25), seeds=3, train_examples=2048, test_examples=1024)
  return config


def probe_the_shape(config) -> None:
  """`make demo`: every probe reads the embedded images' SHAPE (10 classes), a label WSP
  sees only as one of each image's four hashtags (with colour, size and background).

  WSP trains at 1.6e-2 per 256 for 1800 steps: at the WSP demo's own 1e-3 the shape
  probe stays at 0.15 after 1800 steps, at 4e-3 it reaches 0.22 and at 1.6e-2 0.26
  (4e-2: 0.28); 600 steps give 0.19 (seed 0, benchmarks/pre_pretraining.py measures
  the same setting over seeds).
  """
  for stage in config.stages.values():
    stage.data.synthetic_label = 'shape'
  config.stages.wsp.optim.lr_per_256 = 1.6e-2
  config.stages.wsp.total_steps = 1800


def use_colour_as_demo_class(config) -> None:
  """Every stage reads (and probes) the embedded shapes with their colour as the class.

  11 colours: a 2-block ViT at 32 px learns them within a few hundred steps, where the
  10 shapes take WSP thousands of steps at a high lr (probe_the_shape). The colour is
  the shape's, not the background's, so the probe must find the shape.
  """
  for stage in config.stages.values():
    stage.data.synthetic_label = 'colour'
