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


def get_config(arg: str | None = None):
  config = chain_config(mae=mae.get_config(arg), wsp=wsp.get_config(arg))
  config.stages.wsp.init_from.stage = 'mae'
  config.stages.wsp.init_from.take = ('encoder',)
  # Both stages probe their encoder the same way, so the numbers compare.
  for name in ('linear_probe', 'knn'):
    config.stages.mae.evals[name] = config.stages.wsp.evals[name].copy_and_resolve_references()
  if arg == 'demo':
    use_colour_as_demo_class(config)
    # The untrained encoder's probes, before MAE's first step: the baseline that
    # shows what pretraining added (the printout's 'mae (start)' rows).
    for name in ('linear_probe', 'knn'):
      config.stages.mae.evals[name].at_start = True
    # MAWS's low-shot probes of WSP's encoder: fitted on k labelled images per class.
    config.stages.wsp.evals.low_shot = evaluator_config(
        'low_shot', shots=(1, 5, 25), seeds=3, train_examples=2048, test_examples=1024)
  return config


def use_colour_as_demo_class(config) -> None:
  """Every stage reads (and probes) the embedded shapes with their colour as the class.

  11 colours: a 2-block ViT at 32 px learns them within the demo's minutes, while
  telling the 10 shapes apart at that size keeps every probe near chance. The
  colour is the shape's, not the background's, so the probe must find the shape.
  """
  for stage in config.stages.values():
    stage.data.synthetic_label = 'colour'
